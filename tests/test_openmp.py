"""``import sdmaker`` sets libgomp's spin count before torch loads it, unless the user chose one (bench/openmp.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sdmaker.config import OPENMP_SPIN_COUNT

_PRINT = "import os, sdmaker, torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _run(extra: dict[str, str], code: str = _PRINT) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, f"{OPENMP_SPIN_COUNT} None"),
    ({"GOMP_SPINCOUNT": "300000"}, "300000 None"),  # the user's choice is kept
    ({"OMP_WAIT_POLICY": "active"}, "None active"),  # a wait policy says how to wait: no spin count is added
])
def test_spin_count_default(extra: dict[str, str], expected: str) -> None:
    assert _run(extra) == expected


def test_nothing_changes_once_torch_is_loaded() -> None:
    code = "import os, torch, sdmaker; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _run({}, code) == "None"
