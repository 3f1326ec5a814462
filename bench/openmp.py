"""OpenMP spin: one ``mini`` generation on the thread that loaded the model, beside a CPU hog and on a quiet machine.

``sdmaker generate`` (and any script that loads a model and generates on one thread) runs torch's OpenMP
regions from the thread that first used them. libgomp then lets its waiting threads spin 300,000 times
before sleeping, because it sees no more threads than CPUs in its own process; it cannot see the other
processes of a busy machine. ``import sdmaker`` sets ``GOMP_SPINCOUNT=100`` (libgomp's own value when it
knows it is oversubscribed) when the machine is busy at import and the user set no spin count or wait policy;
on a quiet machine it leaves libgomp's default, the faster one there (:func:`sdmaker.config.openmp_spin_default`).

Each side is a fresh process (libgomp reads the variable once, when torch loads it) that loads ``mini`` and
generates its default 64x64 request several times on its main thread; ours is sdmaker's default, the
baseline sets ``GOMP_SPINCOUNT=300000`` (libgomp's default). Two conditions: beside ``2 x cores`` busy-loop
processes (the demo-beside-a-hog case), and with nothing else started (the quiet case, where the default
must not cost anything). Sides alternate; medians of per-generation seconds.

``python -m bench --only openmp [--quick]``; ``python -m bench.openmp --quick`` prints the rows.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import row

LIBGOMP_DEFAULT = "300000"

_CHILD = r"""
import json, sys, time
from pathlib import Path
import sdmaker
from sdmaker.engine import generate, load_model
from sdmaker.models import assemble_builtin
from sdmaker.schema import GenerateRequest

folder = assemble_builtin("mini", Path(sys.argv[1]))
model = load_model(folder, digest="-")
times = []
for i in range(int(sys.argv[2]) + 1):  # the first one warms up
    started = time.perf_counter()
    generate(model, GenerateRequest(prompt="a red circle on the left", seed=i))
    times.append(time.perf_counter() - started)
print(json.dumps(times[1:]))
"""


def _hog() -> None:  # pragma: no cover - runs in a child process until terminated
    while True:
        pass


def _side(folder: Path, runs: int, spin: str | None) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(runs)], env=env, check=True,
                         capture_output=True, text=True, timeout=1800).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


def _compare(folder: Path, runs: int, rounds: int) -> tuple[float, float]:
    ours: list[float] = []
    base: list[float] = []
    for i in range(rounds):
        sides = [(None, ours), (LIBGOMP_DEFAULT, base)]
        for spin, out in sides if i % 2 == 0 else sides[::-1]:
            out += _side(folder, runs, spin)
    return statistics.median(ours), statistics.median(base)


def run(quick: bool) -> list[dict[str, Any]]:
    runs, rounds = (1, 2) if quick else (3, 4)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdmaker-bench-omp-") as tmp:
        folder = Path(tmp) / "mini"
        quiet_load = os.getloadavg()[0]
        ours, base = _compare(folder, runs, rounds)
        rows.append(row("generate on the loading thread, quiet machine: sdmaker's OpenMP default vs libgomp's (300000 spins)", ours,
                        base, "s", f"mini 64x64, its 10 steps, median of {runs * rounds} per side over {rounds} "
                        f"alternating fresh processes; load average {quiet_load:.1f} at start on {cores} cores"))
        hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(2 * cores)]
        for p in hogs:
            p.start()
        try:
            time.sleep(2)
            ours, base = _compare(folder, runs, rounds)
            load = os.getloadavg()[0]
        finally:
            for p in hogs:
                p.terminate()
        rows.append(row("generate on the loading thread beside a CPU hog: sdmaker's OpenMP default (100 spins) vs libgomp's (300000)", ours,
                        base, "s", f"mini 64x64, its 10 steps, {2 * cores} busy-loop processes beside it; median of "
                        f"{runs * rounds} per side over {rounds} alternating fresh processes; load average {load:.1f} "
                        f"at the end on {cores} cores"))
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
