"""The GPU path, ready to prove: ``python -m bench.gpu`` (``bench/gpu.sh`` installs the CUDA torch wheel first).

On one CUDA GPU, within about 8 minutes, writes ``bench/results-gpu.json`` (the shape of ``results.json``):

* SD 2.1 architecture (random weights, the published configs), fp16, 512x512, SDPA attention:
  the seed recipe (the model's own DDIM, 50 steps) end to end, and the explicit fast recipe
  (``dpmpp_2m`` 10 steps + DeepCache 2; labelled as explicit: with random weights ``model tune`` keeps
  the reference on this folder, see bench/tune.py), each with fp32 50 steps as the baseline;
* the UNet step at CFG batch 2 in fp16 vs fp32, and the step batching rows: images/s of N concurrent
  requests through :class:`~sdmaker.engine.StepBatcher` vs one request at a time.

``--dry-run`` runs the same code on the CPU with the tiny SD 2.x-style model, 64x64 and 2 steps, so the
argument parsing and the JSON written are tested without a GPU (tests/bench). The time budget is
checked between rows: rows that would not fit are written as ``SKIPPED`` instead of overrunning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import BENCH_DIR, row, time_call

__all__ = ["main", "parse_args", "run_gpu"]

logger = logging.getLogger("bench.gpu")

FAST_RECIPE = {"scheduler": "dpmpp_2m", "num_inference_steps": 10, "deep_cache_interval": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results-gpu.json")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=50, help="steps of the seed recipe (default 50)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop adding rows after this (default 420)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests in the batching rows")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 64x64, 2 steps: the JSON shape only")
    args = parser.parse_args(argv)
    if args.size % 8 or not 64 <= args.size <= 2048:
        parser.error("--size must be a multiple of 8 from 64 to 2048")
    if not 1 <= args.steps <= 500:
        parser.error("--steps must be from 1 to 500")
    if args.dry_run:
        args.size, args.steps, args.clients = 64, 2, 2
    return args


def _model_dir(kind: str, work: Path) -> Path:
    from sdmaker.engine import build_random_pipeline

    out = work / kind
    if not (out / "model_index.json").exists():
        build_random_pipeline(kind, out)
    return out


def run_gpu(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row of the GPU run, and metadata (GPU name, versions, the budget used)."""
    import torch

    from bench.__main__ import machine_metadata
    from sdmaker.engine import StepBatcher, generate, load_model
    from sdmaker.schema import GenerateRequest

    started = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA GPU visible to torch (torch {torch.__version__}); run bench/gpu.sh, or --dry-run")
    fast_dtype = "fp32" if args.dry_run else "fp16"
    meta = machine_metadata()
    meta.update(mode="dry-run" if args.dry_run else "gpu", size=args.size, device=device,
                cuda=getattr(torch.version, "cuda", None))
    rows: list[dict[str, Any]] = []

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    work = Path(os.environ.get("SDMAKER_BENCH_CACHE") or tempfile.mkdtemp(prefix="bench-gpu-"))
    folder = _model_dir("sd2-tiny" if args.dry_run else "sd21", work)
    label = "SD2-tiny (dry run)" if args.dry_run else "SD2.1 arch"
    models = {"fast": load_model(folder, device=device, dtype=fast_dtype, digest="-"),
              "fp32": load_model(folder, device=device, dtype="fp32", digest="-")}
    meta["load_s"] = round(time.perf_counter() - started, 1)

    def image_s(model: Any, **fields: Any) -> float:
        req = GenerateRequest(prompt="a photo of a red car", seed=0, height=args.size, width=args.size, **fields)
        return time_call(lambda: generate(model, req), repeat=1 if args.dry_run else 2, warmup=1)

    # end to end: the seed recipe, fp16 vs fp32, then the explicit fast recipe
    seed_fast = image_s(models["fast"], num_inference_steps=args.steps)
    seed_fp32 = image_s(models["fp32"], num_inference_steps=args.steps)
    rows.append(row(f"GPU E2E {label} {args.size}²: {fast_dtype} vs fp32, own scheduler {args.steps} steps, SDPA",
                    seed_fast, seed_fp32, "s", "precision only; same request and seed"))
    recipe = dict(FAST_RECIPE)
    fast = image_s(models["fast"], **recipe)
    rows.append(row(f"GPU E2E {label} {args.size}²: explicit recipe dpmpp_2m 10 + DeepCache 2 ({fast_dtype}) vs "
                    f"fp32 {args.steps} steps", fast, seed_fp32, "s",
                    "explicit recipe row: with random weights `model tune` keeps the reference on this folder"))

    # the UNet step at CFG batch 2
    for name, model in models.items():
        pipe = model.pipeline
        lat = args.size // pipe.vae_scale_factor
        sample = torch.randn(2, 4, lat, lat, device=device, dtype=pipe.unet.dtype)
        emb = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=pipe.unet.dtype)
        t = torch.tensor([500.0, 500.0], device=device)

        def step(p: Any = pipe, s: Any = sample, e: Any = emb, ts: Any = t) -> None:
            with torch.inference_mode():
                p.unet(s, ts, encoder_hidden_states=e, return_dict=False)

        meta[f"unet_step_{name}_s"] = time_call(step, repeat=3 if args.dry_run else 10, warmup=2)
    rows.append(row(f"GPU UNet step {label} {args.size}² CFG batch 2: {fast_dtype} vs fp32",
                    meta["unet_step_fast_s"], meta["unet_step_fp32_s"], "s/step", "median, SDPA"))

    # step batching: N concurrent requests through the StepBatcher vs one at a time
    if left() > (30 if not args.dry_run else -1e9):
        from bench.batching import clients_run

        model = models["fast"]
        reqs = [GenerateRequest(prompt=f"a red circle above a blue square {i}", seed=100 + i, height=args.size,
                                width=args.size, **FAST_RECIPE).resolve(model.defaults) for i in range(args.clients)]
        solo_wall, _, _ = clients_run(lambda r: generate(model, r), reqs, args.clients)
        with StepBatcher(model, max_batch=args.clients, max_queue=len(reqs)) as batcher:
            ours_wall, _, _ = clients_run(batcher.submit, reqs, args.clients)
            widest = batcher.stats.max_rows
        rows.append(row(f"GPU batching {label} {args.size}²: images/s, {args.clients} clients",
                        len(reqs) / ours_wall, len(reqs) / solo_wall, "img/s",
                        f"fast recipe, {fast_dtype}; widest UNet call {widest} rows; baseline one request at a time"))
    else:
        rows.append(row("GPU batching: SKIPPED", None, None, "img/s", f"time budget ({args.budget_s:.0f} s) spent"))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, meta = run_gpu(args)
    from bench.__main__ import write_results

    write_results(args.out, rows, meta)
    json.dump({"metadata": meta, "results": rows}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
