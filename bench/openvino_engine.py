"""The OpenVINO engine end to end: served images/s with step batching and DeepCache on, against the torch engine.

Issue 17's bar for a second engine: it must win end to end by at least 1.2x *with batching and DeepCache on*,
not just on the plain step (``bench/peers.py``). So both sides here serve the same requests through one
:class:`~sdmaker.engine.StepBatcher` (2 concurrent clients, so the UNet runs batch 4 with CFG), with the
headline recipe (``bench/quality.py``'s pick: a fast scheduler at few steps and DeepCache), on the SD 2.1
architecture in bf16 at 512²:

- torch: what ``SDMAKER_ENGINE=torch`` serves for that recipe. Its AOTInductor package covers the plain step
  only, so with DeepCache every UNet call runs eager;
- ours: ``SDMAKER_ENGINE=openvino`` (what ``auto`` picks on AVX512-BF16 CPUs, AMX or not): both DeepCache passes
  converted to OpenVINO IR once (the build time is printed; later runs load it from ``bench/cache``).

Rounds alternate the two engines on the one loaded model, after one OpenVINO round timed apart (OpenVINO may
prepare each new input shape on its first inference; the row prints that round's time).
``python -m bench --only openvino_engine`` (about 10 minutes on 2 cores the first time, 6 after; ``--quick`` at
256², one round).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import CACHE_DIR, row
from sdmaker.config import load_settings
from sdmaker.engine._device import SPEED_FLAGS, cpu_flags

__all__ = ["run", "served_rows"]


def _requests(size: int, recipe: dict[str, Any]) -> list[Any]:
    from sdmaker.schema import GenerateRequest

    return [GenerateRequest(prompt=f"a red circle on the left, scene {i}", height=size, width=size, seed=100 + i,
                            scheduler=recipe["scheduler"], num_inference_steps=int(recipe["num_inference_steps"]),
                            deep_cache_interval=int(recipe.get("deep_cache_interval", 0)))
            for i in range(2)]


def run(quick: bool) -> list[dict[str, Any]]:
    import torch

    from bench.engine import sd21_dir
    from bench.quality import headline_recipe
    from sdmaker.engine import cpu_has_native_bf16, load_model
    from sdmaker.engine._openvino import openvino_available

    if torch.cuda.is_available() or not cpu_has_native_bf16() or not openvino_available():
        return [row(NAME, None, None, "img/s", "CPU bf16 benchmark; skipped without native bf16, without openvino "
                                                "or on a CUDA machine")]
    size, rounds = (256, 1) if quick else (512, 2)
    model = load_model(sd21_dir("bf16"), dtype="bf16", digest="-")
    return served_rows(model, headline_recipe(), size=size, rounds=rounds, cache=CACHE_DIR / "engine-compiled")


NAME = "openvino engine: SD2.1 served images/s, 2 clients, step batching + DeepCache, bf16"


def served_rows(model: Any, recipe: dict[str, Any], *, size: int, rounds: int, cache: Path,
                name: str = NAME) -> list[dict[str, Any]]:
    """Alternating rounds of 2 clients through one step batcher, OpenVINO engine vs torch engine, on ``model``."""
    from bench.batching import clients_run
    from sdmaker.engine import StepBatcher, StepCompiler

    requests = _requests(size, recipe)
    compiler = StepCompiler(model, cache, max_sizes=1, backend="openvino",
                            static_batches=load_settings().openvino_static)
    flags = ", ".join(cpu_flags()) or "none of " + "/".join(SPEED_FLAGS)
    walls: dict[str, list[float]] = {"torch": [], "openvino": []}
    images: dict[str, list[Any]] = {}
    with StepBatcher(model, max_batch=8, max_queue=8) as batcher:
        # the first OpenVINO request runs eager and schedules both passes; the child builds them after it
        model.step_compiler = compiler
        began = time.perf_counter()
        clients_run(batcher.submit, requests, len(requests))
        if not compiler.wait(timeout=1800) or compiler.failed or len(compiler.runners) != 2:
            compiler.close()
            model.step_compiler = None
            return [row(name, None, None, "img/s", f"NOT MEASURED: the OpenVINO build failed: {compiler.failed}")]
        build = time.perf_counter() - began
        built = sum(compiler.compile_seconds.values())
        # OpenVINO may prepare each new input shape on its first inference (the batch dimension is free): the
        # first round at these batch sizes is timed apart
        first_use, _, _ = clients_run(batcher.submit, requests, len(requests))
        # ... and the batch sizes it recurs at get their static-shape copies (OpenVinoRunner) in the background
        for runner in compiler.runners.values():
            runner.wait_static(timeout=600)
        static = sorted({b for r in compiler.runners.values() for b in r.static})
        for _ in range(rounds):
            for engine in ("torch", "openvino"):
                model.step_compiler = compiler if engine == "openvino" else None
                wall, _, results = clients_run(batcher.submit, requests, len(requests))
                walls[engine].append(wall)
                images[engine] = results
    compiler.close()
    model.step_compiler = None
    count = sum(len(r.images) for r in images["openvino"])
    ours, base = count / statistics.median(walls["openvino"]), count / statistics.median(walls["torch"])
    diff = float(np.mean([np.abs(np.asarray(a.image, dtype=np.float32) - np.asarray(b.image, dtype=np.float32)).mean()
                          for ra, rb in zip(images["openvino"], images["torch"], strict=True)
                          for a, b in zip(ra.images, rb.images, strict=True)]))
    recipe_text = (f"{recipe['scheduler']} {recipe['num_inference_steps']} steps, DeepCache "
                   f"{recipe.get('deep_cache_interval', 0)} (branch 2)")
    build_text = (f"converted in {built:.0f} s (full + shallow pass, background child) and loaded"
                  if built else "loaded from the cache (converted in an earlier run)")
    return [row(f"{name} {size}², OpenVINO engine vs torch engine", ours, base, "img/s",
                f"{recipe_text}; median of {rounds} alternating round(s): OpenVINO "
                f"{statistics.median(walls['openvino']):.1f} s vs torch {statistics.median(walls['torch']):.1f} s "
                f"per {count} images (first OpenVINO round at these batch sizes, not counted: {first_use:.1f} s); "
                f"torch runs DeepCache's passes eager (its AOTInductor package is the plain step only); OpenVINO "
                f"IR {build_text}, {build:.0f} s from the first request to both passes ready; static copies for "
                f"batch {', '.join(map(str, static)) or 'none'}; mean "
                f"|OpenVINO - torch| {diff:.1f}/255 per pixel ({model.placement.dtype_name} "
                f"rounding through the steps); CPU flags: {flags}")]
