"""Batching benchmark: N concurrent clients, one request at a time (seed) vs the StepBatcher.

Baseline = every client calling ``sdmaker.engine.generate`` on the shared model, i.e. requests run
one at a time (the model lock serialises them), which is what the seed's one-request-per-call
handler does. Ours = the same clients submitting to :class:`~sdmaker.engine.StepBatcher`. Both
runs use the same requests (same seeds); images/s, p95 latency and the largest pixel difference
between the two runs' outputs are reported.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import CACHE_DIR, row

__all__ = ["clients_run", "compare", "mini_model_dir", "run"]


def mini_model_dir() -> tuple[Path, str]:
    """The built-in ``mini`` model when its weights are committed, else the random ``minilm-tiny``."""
    from sdmaker.models import assemble_builtin, is_builtin_ready

    if is_builtin_ready("mini"):
        # Re-assembled on every run (file copies, < 1 s): a cached copy would keep stale weights after the
        # committed ones change, and quality rows would then describe an older model.
        out = assemble_builtin("mini", CACHE_DIR / "mini")
        return out, "mini"
    from sdmaker.engine import build_random_pipeline

    out = CACHE_DIR / "minilm-tiny"
    if not (out / "model_index.json").exists():
        build_random_pipeline("minilm-tiny", out)
    return out, "minilm-tiny (random weights; mini not trained yet)"


def clients_run(fn: Callable[[Any], Any], requests: list[Any], clients: int) -> tuple[float, list[float], list[Any]]:
    """Run ``requests`` from ``clients`` threads; returns wall seconds, per-request latencies, results."""
    results: list[Any] = [None] * len(requests)
    latencies: list[float] = [0.0] * len(requests)
    lock = threading.Lock()
    todo = list(range(len(requests)))
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            started = time.perf_counter()
            try:
                results[i] = fn(requests[i])
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)
                return
            latencies[i] = time.perf_counter() - started

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, latencies, results


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if len(values) > 1 else values[0]


def compare(model: Any, requests: list[Any], *, clients: int, max_batch: int, label: str,
            notes: str = "") -> list[dict[str, Any]]:
    """Rows for one model: img/s, p95 latency, max |batched - solo| over all images."""
    from sdmaker.engine import StepBatcher, generate

    images = sum(len(r.image_seeds()) for r in requests)
    dtype = model.placement.dtype_name
    solo_wall, solo_lat, solo = clients_run(lambda r: generate(model, r), requests, clients)
    with StepBatcher(model, max_batch=max_batch, max_queue=max(len(requests), 1)) as batcher:
        ours_wall, ours_lat, ours = clients_run(batcher.submit, requests, clients)
        stats = batcher.stats
    diffs = np.stack([np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
                      for ra, rb in zip(solo, ours, strict=True) for a, b in zip(ra.images, rb.images, strict=True)])
    diff = int(diffs.max())
    spread = (f"mean {diffs.mean():.2f} levels, {100 * (diffs > 4).mean():.2f}% of pixel values off by more than 4, "
              f"{int((diffs.reshape(len(diffs), -1).max(axis=1) > 4).sum())} of {len(diffs)} images with any")
    mean_rows = stats.max_rows
    detail = (f"{clients} clients, {len(requests)} requests, max_batch {max_batch}; "
              f"{stats.steps} batched steps, widest UNet call {mean_rows} rows. {notes}").strip()
    return [
        row(f"batching {label}: images/s, {clients} clients", images / ours_wall, images / solo_wall, "img/s", detail),
        row(f"batching {label}: p95 latency", _p95(ours_lat), _p95(solo_lat), "s",
            f"median ours {statistics.median(ours_lat):.2f}s vs {statistics.median(solo_lat):.2f}s one at a time"),
        row(f"batching {label}: max pixel diff batched vs solo", float(diff), 1.0, "levels/255",
            f"same seeds, {dtype}; {spread}; " + ("<= 1 level = float diff within rounding (fp32 <= 1e-4 is "
                                                   "asserted in tests)" if dtype == "fp32" else "bf16 GEMMs round "
                                                   "differently per batch shape, and sampling carries the difference "
                                                   "on; the exactness bar is fp32"),
            lower_is_better=True),
    ]


def batch_shape_row(model: Any, size: int, label: str, widest: int = 16, draws: int = 8) -> dict[str, Any]:
    """Which UNet call sizes give their rows other outputs than a ``widest``-row call (the same inputs).

    Why batched images can differ from solo ones in bf16: a row's output is the same at every call size only
    if every kernel splits its work the same way for every size. Whether a different split changes a rounding
    depends on the values too, so ``draws`` sets of inputs (random latents and text, two timesteps) are tried:
    for each, one call of ``widest`` rows is the reference and each smaller size runs on its first rows.
    """
    import torch

    unet = model.pipeline.unet
    param = next(unet.parameters())
    latent = size // model.pipeline.vae_scale_factor
    t = torch.tensor([999, 500] * (widest // 2))
    differ: dict[int, float] = {}
    for draw in range(draws):
        gen = torch.Generator().manual_seed(draw)
        x = torch.randn(widest, unet.config.in_channels, latent, latent, generator=gen).to(param.dtype)
        text = torch.randn(widest, 32, unet.config.cross_attention_dim, generator=gen).to(param.dtype)
        with torch.no_grad():
            ref = unet(x, t, encoder_hidden_states=text).sample.float()
            for n in range(1, widest):
                out = unet(x[:n], t[:n], encoder_hidden_states=text[:n]).sample.float()
                differ[n] = max(differ.get(n, 0.0), float((out - ref[:n]).abs().max()))
    bad = [n for n, d in differ.items() if d > 0]
    return row(f"batching {label}: UNet call sizes whose rows differ from a {widest}-row call",
               float(len(bad)), 0.0, "count",
               f"{model.placement.dtype_name}, {size}², {draws} random draws of inputs; sizes 1-{widest - 1}: "
               f"differing {bad or 'none'} (largest |diff| {max(differ.values()):.3g}); 0 = batch-invariant on "
               "these inputs", lower_is_better=True)


def _requests(n: int, steps: int, size: int, model: Any) -> list[Any]:
    from sdmaker.schema import GenerateRequest

    return [GenerateRequest(prompt=f"a red circle above a blue square {i}", height=size, width=size,
                            num_inference_steps=steps, seed=1000 + i).resolve(model.defaults) for i in range(n)]


def run(quick: bool) -> list[dict[str, Any]]:
    import gc

    from sdmaker.engine import load_model, recommended_dtype

    path, label = mini_model_dir()
    mini = load_model(path, digest="-")
    size = max(64, int(mini.defaults.get("height", mini.native_size)))
    steps = int(mini.defaults.get("num_inference_steps", 20))
    rows = compare(mini, _requests(16 if quick else 32, steps, size, mini), clients=8, max_batch=8,
                   label=label.split()[0], notes=f"{label}, {size}², {steps} steps, {mini.placement.dtype_name}")
    rows.append(batch_shape_row(mini, size, label.split()[0]))
    del mini
    gc.collect()

    from bench.engine import sd21_dir

    dtype = recommended_dtype("cpu")
    sd21 = load_model(sd21_dir(dtype), dtype=dtype, digest="-")
    n, steps = (4, 2) if quick else (8, 4)
    rows += compare(sd21, _requests(n, steps, 256, sd21), clients=4, max_batch=4, label="SD2.1 arch",
                    notes=f"256², {steps} steps, {dtype}; compute-bound on 2 cores, target ratio >= 0.95")
    return rows
