"""The one engine loop: ``generate`` matches the diffusers pipeline (the reference, used here only), is
bit-identical run to run, maps torch failures in one place, and the engine modules import one way."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdmaker.engine import StepBatcher, generate, load_model, make_scheduler
from sdmaker.errors import EngineError, OutOfMemoryError
from sdmaker.schema import SCHEDULERS, GenerateRequest, ResolvedRequest

ENGINE = Path(__file__).resolve().parents[2] / "sdmaker" / "engine"


def pipeline_reference(model: Any, request: GenerateRequest) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """What ``generate`` returned before it ran sdmaker's loop: the diffusers pipeline, called whole.

    Same per-image CPU generators, a fresh scheduler of the requested kind; float images and the progress
    callback's ``(step, total)`` calls.
    """
    req = request if isinstance(request, ResolvedRequest) else request.resolve(model.defaults)
    pipe = model.pipeline
    seen: list[tuple[int, int]] = []

    def callback(pipe_: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append((step + 1, int(pipe_.num_timesteps)))
        return kwargs

    negs = req.negative_prompt
    if isinstance(negs, str):
        negs = [negs] * len(req.prompts)
    with model.lock:
        base = pipe.scheduler
        pipe.scheduler = make_scheduler(req.scheduler, base.config) if req.scheduler else \
            type(base).from_config(base.config)
        try:
            with torch.inference_mode():
                out = pipe(prompt=req.prompts, negative_prompt=negs, height=req.height, width=req.width,
                           num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                           num_images_per_prompt=req.num_images_per_prompt,
                           generator=[torch.Generator("cpu").manual_seed(s) for s in req.image_seeds()],
                           output_type="np", callback_on_step_end=callback)
        finally:
            pipe.scheduler = base
    return np.asarray(out.images), seen


def _ours(model: Any, request: GenerateRequest) -> tuple[np.ndarray, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    result = generate(model, request, on_step=lambda s, t: seen.append((s, t)))
    assert result.arrays is not None
    return result.arrays, seen


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_generate_matches_the_diffusers_pipeline_for_every_scheduler(sd1_model, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    req = GenerateRequest(prompt=["a cat", "a dog"], negative_prompt="blurry", num_images_per_prompt=2, seed=5,
                          scheduler=scheduler, height=64, width=64, num_inference_steps=3, guidance_scale=7.5)
    ours, ours_steps = _ours(sd1_model, req)
    ref, ref_steps = pipeline_reference(sd1_model, req)
    assert ours.shape == ref.shape == (4, 64, 64, 3)
    assert float(np.abs(ours - ref).max()) <= 1e-4
    assert ours_steps == ref_steps  # the progress callback reports what the pipeline reported


@pytest.mark.parametrize(("fixture", "guidance", "negative"), [
    ("sd2_dir", 7.5, ["ugly", "dark"]),  # v-prediction, a negative per prompt
    ("sd2_dir", 1.0, None),  # no classifier-free guidance: one UNet row per image
    ("minilm_dir", 4.0, None),  # BERT text encoder, empty negatives
])
def test_generate_matches_the_pipeline_across_architectures(fixture: str, guidance: float, negative: Any,
                                                            request: pytest.FixtureRequest) -> None:
    model = load_model(request.getfixturevalue(fixture), dtype="fp32")
    req = GenerateRequest(prompt=["a red circle", "a blue square"], negative_prompt=negative, seed=11,
                          height=64, width=72, num_inference_steps=3, guidance_scale=guidance)
    ours, _ = _ours(model, req)
    ref, _ = pipeline_reference(model, req)
    assert float(np.abs(ours - ref).max()) <= 1e-4


def test_generate_is_bit_identical_run_to_run(sd1_model) -> None:  # type: ignore[no-untyped-def]
    for scheduler in ("euler_a", "dpmpp_2m", "ddpm"):  # ancestral noise included
        req = GenerateRequest(prompt=["a cat", "a dog"], num_images_per_prompt=2, seed=3, scheduler=scheduler,
                              height=64, width=64, num_inference_steps=3)
        a, b = generate(sd1_model, req), generate(sd1_model, req)
        assert a.arrays is not None and b.arrays is not None
        assert np.array_equal(a.arrays, b.arrays)
        assert [a.encode(i) for i in range(4)] == [b.encode(i) for i in range(4)]


def _failing_unet(model: Any, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    unet = model.pipeline.unet

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(unet, "forward", boom)


@pytest.mark.parametrize(("raised", "expected", "text"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), OutOfMemoryError, "fewer images"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried... out of memory"), OutOfMemoryError,
     "2 image"),
    (RuntimeError("shape mismatch"), EngineError, "generation failed: shape mismatch"),
])
def test_torch_failures_map_to_sdmaker_errors_in_generate_and_the_batcher(
        sd1_dir: Path, monkeypatch: pytest.MonkeyPatch, raised: BaseException, expected: type, text: str) -> None:
    model = load_model(sd1_dir, dtype="fp32")
    _failing_unet(model, monkeypatch, raised)
    req = GenerateRequest(prompt="x", num_images_per_prompt=2, seed=0, height=64, width=64, num_inference_steps=2)
    with pytest.raises(expected, match=text) as info:
        generate(model, req)
    assert info.value.__cause__ is raised
    with StepBatcher(model, max_batch=4) as batcher, pytest.raises(expected, match=text):
        batcher.submit(req)


def _engine_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ENGINE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdmaker.engine."):
                deps.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("sdmaker.engine.")}
        graph[path.stem] = deps
    return graph


def test_engine_modules_import_one_way_and_avoid_diffusers_private_state() -> None:
    graph = _engine_imports()
    assert "_generate" not in graph["_loop"] and "_batching" not in graph["_loop"]
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:  # depth-first search for a back edge
        state[node] = 1
        for dep in graph.get(node, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    for path in ENGINE.glob("*.py"):
        assert "_execution_device" not in path.read_text(), path.name
