"""``python -m bench [--quick] [--only NAME] [--out PATH]``: run the benchmarks, write results.json.

Modules run in order; one that fails adds a ``FAILED`` row and the suite goes on, so a broken
benchmark is visible in the table instead of hiding every other figure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import BENCH_DIR, row

MODULES = ("quality", "engine", "batching", "package", "deploy", "reliability", "transform", "openai_route", "progress", "scaleout", "tune", "peers", "attention", "openvino_engine", "async_jobs", "multi_model", "edit", "adapters", "lora_latents", "lora_eval", "vae_roundtrip", "openmp")  # quality first: it picks the recipe


def machine_metadata() -> dict[str, Any]:
    """CPU model, cores, date and library versions: the context every figure needs."""
    from sdmaker.engine._device import cpu_flags
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta: dict[str, Any] = {
        "cpu_model": cpu, "cpu_flags": sorted(cpu_flags()), "cores": os.cpu_count(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
    }
    try:
        import diffusers
        import torch

        meta.update(torch=torch.__version__, diffusers=diffusers.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return meta


def run_module(name: str, quick: bool) -> list[dict[str, Any]]:
    if importlib.util.find_spec(f"bench.{name}") is None:
        return []
    started = time.perf_counter()
    try:
        mod = importlib.import_module(f"bench.{name}")
        rows = list(mod.run(quick))
    except Exception as exc:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        rows = [row(f"{name}: FAILED", None, None, "", f"{type(exc).__name__}: {exc}")]
    logging.getLogger("bench").info("bench.%s: %d rows in %.0fs", name, len(rows), time.perf_counter() - started)
    return rows


def write_results(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump({"metadata": meta, "results": rows}, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sdmaker benchmarks — {meta.get('cpu_model')}, {meta.get('cores')} cores, {meta.get('date')}")
    for col in ("name", "ours", "baseline", "unit", "ratio", "notes"):
        table.add_column(col, overflow="fold", max_width=60 if col == "notes" else None)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3g}x"
        table.add_row(r["name"], _fmt(r["ours"]), _fmt(r["baseline"]), r["unit"], ratio, r["notes"])
    Console(width=200).print(table)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _run_label(meta: dict[str, Any]) -> str:
    """How the table names the run that ``meta`` describes."""
    cpu = f" on {meta['cpu_model']}" if meta.get("cpu_model") else ""  # rows of several runs may come from two CPUs
    return (f"`python -m bench{' --quick' if meta.get('mode') == 'quick' else ''}` of {meta.get('date')} "
            f"({meta.get('wall_s')} s){cpu}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the <= 10 minute subset")
    parser.add_argument("--only", action="append", choices=MODULES, help="run only this module (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results.json (--gpu: results-gpu.json)")
    parser.add_argument("--gpu", action="store_true", help="the GPU run instead (bench/gpu.py; bench/gpu.sh installs "
                        "the CUDA torch wheel first); writes bench/results-gpu.json")
    args, rest = parser.parse_known_args(argv)
    if args.gpu:
        from bench.gpu import main as gpu_main

        return gpu_main(rest + (["--out", str(args.out)] if args.out is not None else []))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.out = args.out or BENCH_DIR / "results.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = machine_metadata()
    meta["mode"] = "quick" if args.quick else "full"
    rows: list[dict[str, Any]] = []
    owners: dict[str, list[str]] = {}
    started = time.perf_counter()
    for name in args.only or MODULES:
        got = run_module(name, args.quick)
        owners[name] = [r["name"] for r in got]
        rows += got
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    runs = dict.fromkeys(owners, _run_label(meta))
    if args.only and args.out.exists():  # keep the other modules' rows, each with the run it came from
        old = json.loads(args.out.read_text())
        prev = old.get("metadata", {})
        old_owners = prev.get("modules", {})
        old_runs = prev.get("module_runs") or {}  # files from before module_runs: the file's own run
        keep = {n for m, names in old_owners.items() if m not in owners for n in names}
        rows = [r for r in old.get("results", []) if r["name"] in keep] + rows
        for m in old_owners:
            if m not in owners:
                runs[m] = old_runs.get(m, _run_label(prev))
        owners = {**{m: v for m, v in old_owners.items() if m not in owners}, **owners}
        others = sorted({run for m, run in runs.items() if m not in args.only})
        meta["note"] = (f"{', '.join(args.only)} re-run in this mode; "
                        + "; ".join(f"{', '.join(sorted(m for m, r in runs.items() if r == run))} rows come from {run}"
                                    for run in others))
    meta["module_runs"] = runs
    meta["modules"] = owners
    write_results(args.out, rows, meta)
    print_table(rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
