"""Judge image-to-image and inpainting on a scene model with the scene analyser (``sdmaker eval --task ...``).

Held-out cases, a pure function of ``(n, seed)`` drawn with a seed never used for training:

* ``img2img``: a rendered scene of one red circle on the left (random background, size, jitter) is
  edited with the eval-template caption of the same scene with a *blue* circle, at strength 0.7. A case
  passes when the analyser finds a blue circle on the left.
* ``inpaint``: a rendered scene of one shape (not a yellow star) on the left, its right half masked,
  edited with the caption of the two-shape scene that adds a yellow star on the right. A case passes when
  the analyser finds a yellow star whose centre lies in the right half, and the unmasked left half is
  unchanged (mean absolute difference <= 2/255; the engine pastes the input back outside the mask).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdmaker.training._analyser import analyse
from sdmaker.training._captions import caption
from sdmaker.training._scenes import COLORS, IMAGE_SIZE, SHAPES, SIZES, Scene, ShapeSpec, render, scene_rng

__all__ = ["EDIT_EVAL_SEED", "EDIT_TASKS", "EditCase", "EditReport", "edit_cases", "evaluate_edits"]

EDIT_EVAL_SEED = 515151
EDIT_TASKS = ("img2img", "inpaint")
#: The img2img strength the issue's target names.
IMG2IMG_STRENGTH = 0.7
#: Mean absolute difference allowed in the unmasked half (of 1.0).
UNCHANGED_MAX = 2 / 255
BATCH = 8


@dataclass(frozen=True)
class EditCase:
    source: Scene  # rendered as the input image
    target: Scene  # what the prompt describes
    prompt: str


def _jitter(rng: Any, xy: tuple[float, float]) -> tuple[float, float]:
    return (xy[0] + rng.uniform(-1, 1), xy[1] + rng.uniform(-1, 1))


def edit_cases(task: str, n: int = 32, seed: int = EDIT_EVAL_SEED) -> list[EditCase]:
    """The deterministic held-out cases of ``task`` (module docstring)."""
    cases: list[EditCase] = []
    for i in range(n):
        rng = scene_rng(seed + (0 if task == "img2img" else 7919), i)
        if task == "img2img":
            background = rng.choice([c for c in COLORS if c not in ("red", "blue")])
            size, center = rng.choice(list(SIZES)), _jitter(rng, (16, 32))
            source = Scene(background, (ShapeSpec("red", "circle", size, center, "left"),))
            target = Scene(background, (ShapeSpec("blue", "circle", size, center, "left"),))
        elif task == "inpaint":
            background = rng.choice([c for c in COLORS if c != "yellow"])
            color = rng.choice([c for c in COLORS if c not in (background, "yellow")])
            shape = rng.choice(SHAPES)
            size, center = rng.choice(list(SIZES)), _jitter(rng, (16, 32))
            left = ShapeSpec(color, shape, size, center, "left")
            star = ShapeSpec("yellow", "star", rng.choice(list(SIZES)), _jitter(rng, (48, 32)))
            source = Scene(background, (left,))
            target = Scene(background, (left, star), "left of")
        else:
            raise ValueError(f"task={task!r}: one of {', '.join(EDIT_TASKS)}")
        cases.append(EditCase(source, target, caption(target, rng, split="eval")))
    return cases


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def right_half_mask(size: int = IMAGE_SIZE) -> Any:
    """White (repaint) right half, black (keep) left half."""
    from PIL import Image

    arr = np.zeros((size, size), dtype=np.uint8)
    arr[:, size // 2:] = 255
    return Image.fromarray(arr)


def score_edit(task: str, case: EditCase, source: Any, output: Any) -> dict[str, float]:
    """Per-case results: ``pass`` plus the attributes it is made of (1.0 / 0.0)."""
    analysis = analyse(output)
    if task == "img2img":
        det = analysis.shapes[0] if analysis.shapes else None
        out = {"color": float(det is not None and det.color == "blue"),
               "shape": float(det is not None and det.shape == "circle"),
               "position": float(det is not None and det.position == "left")}
        out["pass"] = float(out["color"] and out["position"])
        out["all"] = float(out["pass"] and out["shape"])
        return out
    half = IMAGE_SIZE // 2
    src = np.asarray(source.convert("RGB"), dtype=np.float64) / 255
    got = np.asarray(output.convert("RGB"), dtype=np.float64) / 255
    diff = float(np.abs(src[:, :half] - got[:, :half]).mean())
    stars = [s for s in analysis.shapes if s.color == "yellow" and s.shape == "star"]
    yellow = [s for s in analysis.shapes if s.color == "yellow"]
    out = {"star_right": float(any(s.center[0] > half for s in stars)),
           "yellow_right": float(any(s.center[0] > half for s in yellow)),
           "unchanged": float(diff <= UNCHANGED_MAX), "unmasked_diff": diff}
    out["pass"] = float(out["star_right"] and out["unchanged"])
    return out


@dataclass
class EditReport:
    task: str
    metrics: dict[str, float]
    n: int
    settings: dict[str, Any]
    seconds: float
    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "n": self.n, "settings": self.settings,
                "seconds": round(self.seconds, 2)}


def evaluate_edits(model: Any, task: str, *, n: int = 32, steps: int | None = None, seed: int = 0,
                   guidance_scale: float | None = None, strength: float | None = None, scheduler: str | None = None,
                   deep_cache_interval: int | None = None,
                   on_batch: Callable[[int, int], None] | None = None, keep_images: bool = False) -> EditReport:
    """Run ``task``'s held-out cases on ``model`` (a LoadedModel) and score them with the analyser.

    The cases go through the step batcher together (one UNet call per step for up to :data:`BATCH` of them),
    which gives each one the image it would get alone (the batching tests hold it to that).
    """
    from sdmaker.engine import StepBatcher
    from sdmaker.schema import parse_request

    started = time.perf_counter()
    cases = edit_cases(task, n)
    mask = _png_b64(right_half_mask()) if task == "inpaint" else None
    sources = [render(case.source) for case in cases]
    requests = []
    for i, (case, source) in enumerate(zip(cases, sources, strict=True)):
        data: dict[str, Any] = {"prompt": case.prompt, "image": _png_b64(source), "seed": seed + i, "format": "png"}
        if mask is not None:
            data["mask_image"] = mask
        if task == "img2img" or strength is not None:
            data["strength"] = strength if strength is not None else IMG2IMG_STRENGTH
        for key, value in (("num_inference_steps", steps), ("guidance_scale", guidance_scale),
                           ("scheduler", scheduler), ("deep_cache_interval", deep_cache_interval)):
            if value is not None:
                data[key] = value
        requests.append(parse_request(data).resolve(model.defaults))
    settings: dict[str, Any] = {}
    if requests:
        request = requests[0]
        settings = {"num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
                    "strength": request.strength, "scheduler": request.scheduler or model.default_scheduler,
                    "deep_cache_interval": request.deep_cache_interval, "size": f"{request.width}x{request.height}",
                    "seed": seed}
    rows: list[dict[str, Any]] = []
    with StepBatcher(model, max_batch=BATCH, max_queue=max(64, len(requests)), heavy_step_s=None) as batcher:
        jobs = [batcher.submit_async(r) for r in requests]
        for i, (case, source, job) in enumerate(zip(cases, sources, jobs, strict=True)):
            output = job.result().images[0].image
            row: dict[str, Any] = {"prompt": case.prompt, **score_edit(task, case, source, output)}
            if keep_images:
                row["image"], row["source"] = output, source
            rows.append(row)
            if on_batch is not None and ((i + 1) % BATCH == 0 or i + 1 == len(cases)):
                on_batch(i + 1, len(cases))
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)] if rows else []
    metrics = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return EditReport(task, metrics, len(rows), settings, time.perf_counter() - started, rows)
