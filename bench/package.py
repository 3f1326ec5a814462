"""Packaging benchmark: ``sdmaker model package`` vs the seed's ``tar | pigz`` and plain ``tar czf``.

    python bench/package.py [--size-gb N] [--quick]

Builds (once, cached under ``bench/cache/``) a Stable-Diffusion-shaped folder of random fp16
safetensors (N(0, 0.02) values, like trained weights: they barely compress) plus JSON configs, then
times, in the same run and on the same warm page cache:

* sdmaker ``.tar.gz`` (auto: weights as stored deflate blocks, text at level 6, parallel, one gzip member),
  ``.tar.gz`` forced to level 6 (same compression as pigz's default), ``.tar.zst`` and ``.tar``;
* ``tar --use-compress-program=pigz -cf`` (the seed's command; ``apt-get install -y pigz`` if missing),
  ``tar czf`` and ``tar cf`` (a plain copy, the floor for an uncompressed artifact).

Every output is fsynced before its clock stops (sdmaker always fsyncs; the baselines get the same),
and each sdmaker ``.tar.gz`` is checked with ``gzip -t``. ``run(quick)`` returns the rows for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `sdmaker` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from bench import CACHE_DIR, row
except ImportError:  # pragma: no cover - bench/__init__ is the runner's; keep this script standalone
    CACHE_DIR = Path(__file__).resolve().parent / "cache"

    def row(name: str, ours: float | None, baseline: float | None, unit: str, notes: str = "", *,
            lower_is_better: bool | None = None) -> dict[str, Any]:
        lower = True if lower_is_better is None else lower_is_better
        ratio = None if not ours or not baseline else (baseline / ours if lower else ours / baseline)
        return {"name": name, "ours": ours, "baseline": baseline, "unit": unit, "ratio": ratio, "notes": notes}

#: share of the model's bytes per component (SD 1.5: unet 3.4 GB, text encoder 0.5 GB, vae 0.3 GB in fp32)
_LAYOUT = (("unet/diffusion_pytorch_model.safetensors", 0.80), ("text_encoder/model.safetensors", 0.13),
           ("vae/diffusion_pytorch_model.safetensors", 0.07))
_BLOCK_ELEMS = 16 * 1024 * 1024  # fp16 values generated per block (32 MiB)


def _write_safetensors(path: Path, nbytes: int, rng: Any) -> None:
    """A valid safetensors file of fp16 N(0, 0.02) tensors (64 MiB each), streamed block by block."""
    import numpy as np

    per_tensor = 64 * 1024 * 1024
    sizes = [per_tensor] * (nbytes // per_tensor) + ([nbytes % per_tensor] if nbytes % per_tensor else [])
    header: dict[str, Any] = {}
    offset = 0
    for i, size in enumerate(sizes):
        size -= size % 2
        header[f"layer.{i}.weight"] = {"dtype": "F16", "shape": [size // 2], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        remaining = offset
        while remaining:
            n = min(_BLOCK_ELEMS, remaining // 2)
            fh.write((rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
            remaining -= 2 * n


def model_folder(size_gb: float) -> Path:
    """The cached random model of ``size_gb`` GB (built on first use)."""
    import numpy as np

    root = CACHE_DIR / f"package-{size_gb:g}gb"
    marker = root / ".complete"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    total = int(size_gb * 1e9)
    for rel, share in _LAYOUT:
        _write_safetensors(root / rel, int(total * share), rng)
    configs = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
        "unet/config.json": {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768},
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "hidden_size": 768},
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "prediction_type": "epsilon"},
    }
    for rel, data in configs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data, indent=2))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({f"tok{i}": i for i in range(49408)}))
    (root / ".git").mkdir(exist_ok=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    marker.write_text("ok\n")
    return root


def _warm(folder: Path) -> int:
    """Read every file once so all contenders start from the same warm page cache; returns total bytes."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                while chunk := fh.read(16 * 1024 * 1024):
                    total += len(chunk)
    return total


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _timed_cmd(cmd: list[str], out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    _fsync(out)
    return time.perf_counter() - started


def _measure(label: str, fn: Callable[[], Path]) -> dict[str, Any]:
    """Median of 3 runs for contenders under 10 s (disk writeback noise), one run for slower ones."""
    times: list[float] = []
    cpus: list[float] = []
    while True:
        cpu0 = _cpu_seconds()
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
        cpus.append(_cpu_seconds() - cpu0)
        if len(times) == 3 or times[0] >= 10:
            break
        out.unlink()
    seconds = statistics.median(times)
    cpu = statistics.median(cpus)
    size = out.stat().st_size
    print(f"  {label:<14} {seconds:8.2f} s wall {cpu:8.2f} s cpu {size / 2**30:7.3f} GiB  "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})", flush=True)
    return {"label": label, "seconds": seconds, "cpu": cpu, "bytes": size, "path": out, "runs": times}


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its finished children (tar, pigz).

    Unlike wall time it does not grow when other work shares the cores, so it is the steadier figure
    on a busy machine."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(size_gb: float) -> dict[str, dict[str, Any]]:
    """Time every contender on the cached folder of ``size_gb`` GB; outputs are deleted afterwards."""
    from sdmaker.store import package_model

    folder = model_folder(size_gb)
    nbytes = _warm(folder)
    load = os.getloadavg()[0]
    print(f"model folder: {folder} ({nbytes / 2**30:.2f} GiB, {os.cpu_count()} cores, load average {load:.1f})",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pkg-", dir=CACHE_DIR) as tmp:
        work = Path(tmp)

        def ours(name: str, **kwargs: Any) -> Callable[[], Path]:
            return lambda: Path(package_model(folder, work / name, **kwargs).path)

        contenders: list[tuple[str, Callable[[], Path]]] = [
            ("ours_gzip", ours("ours.tar.gz")),
            ("ours_gzip_l6", ours("ours-l6.tar.gz", gzip_level=6)),
            ("ours_zstd", ours("ours.tar.zst")),
            ("ours_tar", ours("ours.tar")),
        ]
        excl = ["--exclude=.git", "-C", str(folder), "."]
        if shutil.which("pigz"):
            contenders.append(("pigz", lambda: _cmd_out(["tar", "--use-compress-program=pigz", "-cf"], excl,
                                                        work / "pigz.tar.gz")))
        contenders.append(("tar_czf", lambda: _cmd_out(["tar", "-czf"], excl, work / "tar.tar.gz")))
        contenders.append(("tar_cf", lambda: _cmd_out(["tar", "-cf"], excl, work / "plain.tar")))
        for key, fn in contenders:
            results[key] = _measure(key, fn)
            if results[key]["path"].name.endswith(".tar.gz") and key.startswith("ours"):
                subprocess.run(["gzip", "-t", str(results[key]["path"])], check=True)  # valid for plain gzip/tar
            results[key]["path"].unlink()
    results["_input"] = {"bytes": nbytes, "load": load, "load_end": os.getloadavg()[0]}
    return results


def _cmd_out(cmd: list[str], rest: list[str], out: Path) -> Path:
    _timed_cmd([*cmd, str(out), *rest], out)
    return out


def rows_from(results: dict[str, dict[str, Any]], size_gb: float) -> list[dict[str, Any]]:
    gib = size_gb * 1e9 / 2**30
    load = f"load avg {results['_input']['load']:.1f}->{results['_input']['load_end']:.1f} on {os.cpu_count()} cores"
    pigz = results.get("pigz")
    pigz_s = pigz["seconds"] if pigz else None
    pigz_note = "" if pigz else "pigz not installed (apt-get install -y pigz): no baseline"
    out = [
        row(f"package {gib:.1f} GiB: sdmaker .tar.gz vs tar|pigz", results["ours_gzip"]["seconds"], pigz_s, "s",
            pigz_note or f"weights as stored deflate blocks, text level 6, parallel; plain tar -xzf reads it; {load}"),
        row(f"package {gib:.1f} GiB: sdmaker .tar.gz vs tar czf", results["ours_gzip"]["seconds"],
            results["tar_czf"]["seconds"], "s"),
        row(f"package {gib:.1f} GiB: sdmaker .tar.gz level 6 vs tar|pigz", results["ours_gzip_l6"]["seconds"], pigz_s,
            "s", pigz_note or "same deflate level as pigz: parallel deflate only"),
        row(f"package {gib:.1f} GiB: sdmaker .tar.zst vs tar|pigz", results["ours_zstd"]["seconds"], pigz_s, "s",
            pigz_note),
        row(f"package {gib:.1f} GiB: sdmaker .tar vs tar cf", results["ours_tar"]["seconds"],
            results["tar_cf"]["seconds"], "s", "uncompressed artifact vs a plain tar copy"),
        row(f"package {gib:.1f} GiB CPU time: sdmaker .tar.gz vs tar|pigz", results["ours_gzip"]["cpu"],
            pigz["cpu"] if pigz else None, "s", pigz_note or "user+sys CPU seconds (steady under load)"),
        row(f"package {gib:.1f} GiB CPU time: sdmaker .tar.gz level 6 vs tar|pigz", results["ours_gzip_l6"]["cpu"],
            pigz["cpu"] if pigz else None, "s", pigz_note),
        row(f"package {gib:.1f} GiB CPU time: sdmaker .tar.zst vs tar|pigz", results["ours_zstd"]["cpu"],
            pigz["cpu"] if pigz else None, "s", pigz_note),
        row(f"artifact size {gib:.1f} GiB: sdmaker .tar.gz vs tar|pigz", results["ours_gzip"]["bytes"] / 2**30,
            pigz["bytes"] / 2**30 if pigz else None, "GiB", "random fp16 weights barely compress"),
        row(f"artifact size {gib:.1f} GiB: sdmaker .tar.zst vs tar|pigz", results["ours_zstd"]["bytes"] / 2**30,
            pigz["bytes"] / 2**30 if pigz else None, "GiB"),
    ]
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows for ``python -m bench`` (0.5 GB folder when quick, 2 GB otherwise)."""
    size = 0.5 if quick else 2.0
    return rows_from(measure(size), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=None, help="model folder size (default 2, --quick 0.5)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = args.size_gb if args.size_gb is not None else (0.5 if args.quick else 2.0)
    rows = rows_from(measure(size), size)
    print()
    print(f"{'benchmark':<58} {'ours':>9} {'baseline':>9} {'unit':>5} {'ratio':>7}  notes")
    for r in rows:
        ours = "-" if r["ours"] is None else f"{r['ours']:.3f}"
        base = "-" if r["baseline"] is None else f"{r['baseline']:.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['name']:<58} {ours:>9} {base:>9} {r['unit']:>5} {ratio:>7}  {r['notes']}")
    print("\nratio > 1: sdmaker is better (faster, or smaller for sizes)")


if __name__ == "__main__":
    main()
