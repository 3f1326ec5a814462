"""sdmaker's benchmark suite: every figure measured side by side with its baseline, as a ratio.

Each benchmark module exposes ``run(quick: bool) -> list[dict]``; a row is
``{"name", "ours", "baseline", "unit", "ratio", "notes"}``. ``ratio`` always reads "how many times
better ours is" (>1 = better): ``baseline / ours`` for times and sizes, ``ours / baseline`` for rates.
``python -m bench [--quick] [--only NAME]`` runs them all and writes ``bench/results.json``.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BENCH_DIR", "CACHE_DIR", "row", "time_call"]

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / "cache"

#: units where a smaller number is better (ratio = baseline / ours)
_LOWER_IS_BETTER = {"s", "ms", "GiB", "MiB", "s/step", "s/image", "x"}


def row(name: str, ours: float | None, baseline: float | None, unit: str, notes: str = "", *,
        lower_is_better: bool | None = None) -> dict[str, Any]:
    """One result row; ``ratio`` > 1 means ours is better than the baseline."""
    lower = unit in _LOWER_IS_BETTER if lower_is_better is None else lower_is_better
    ratio = None
    if ours is not None and baseline is not None and ours > 0 and baseline > 0:
        ratio = baseline / ours if lower else ours / baseline
    return {"name": name, "ours": _round(ours), "baseline": _round(baseline), "unit": unit,
            "ratio": _round(ratio), "notes": notes}


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return float(f"{value:.4g}")


def time_call(fn: Callable[[], Any], *, repeat: int = 1, warmup: int = 0) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        _sync()
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sync() -> None:
    """Wait for queued GPU work, so wall times cover it (no-op on CPU)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def max_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
