"""``import sdmaker`` lowers libgomp's spin count on a busy machine, before torch loads it (bench/openmp.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sdmaker.config import OPENMP_SPIN_COUNT, machine_is_busy, openmp_spin_for


@pytest.mark.parametrize(("env", "busy", "expected"), [
    ({}, True, OPENMP_SPIN_COUNT),
    ({}, False, None),  # a quiet machine keeps libgomp's long spin: faster there
    ({"GOMP_SPINCOUNT": "300000"}, True, None),  # the user's choice is kept
    ({"OMP_WAIT_POLICY": "active"}, True, None),  # a wait policy says how to wait: no spin count is added
])
def test_spin_count_default(env: dict[str, str], busy: bool, expected: str | None) -> None:
    assert openmp_spin_for(env, busy) == expected


def test_busy_is_a_bool() -> None:
    assert machine_is_busy() in (True, False)


def _run(extra: dict[str, str], code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_import_keeps_the_users_value() -> None:
    code = "import os, sdmaker; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _run({}, code) in (OPENMP_SPIN_COUNT, "None")  # set or not, as the machine's load says
    assert _run({"GOMP_SPINCOUNT": "5"}, code) == "5"


def test_nothing_changes_once_torch_is_loaded() -> None:
    code = "import os, torch, sdmaker; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _run({}, code) == "None"
