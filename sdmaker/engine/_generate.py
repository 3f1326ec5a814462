"""Run one generation request on a loaded model.

Reproducibility: every output image has its own CPU ``torch.Generator`` seeded with its reported
seed (``request.seed + i``), so its initial noise (and any ancestral noise) does not depend on its
position in the batch or on the device. The same request with the same seed on the same machine
gives bit-identical images (a test asserts it); image ``i`` regenerated alone from its own seed gives
the same picture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from sdmaker import __version__
from sdmaker.engine._images import MIME_TYPES, encode_image
from sdmaker.engine._loader import LoadedModel
from sdmaker.engine._schedulers import make_scheduler, scheduler_name_of
from sdmaker.errors import EngineError, OutOfMemoryError
from sdmaker.schema import GenerateRequest, ResolvedRequest

__all__ = ["GeneratedImage", "GenerationResult", "StepCallback", "generate"]

logger = logging.getLogger(__name__)

#: ``on_step(step, total)`` is called after each denoising step (1-based ``step``).
StepCallback = Callable[[int, int], None]


@dataclass
class GeneratedImage:
    """One output image and the single-image request that regenerates it."""

    image: Image.Image
    seed: int
    prompt: str
    negative_prompt: str | None
    index: int


@dataclass
class GenerationResult:
    """Images of one request, in output order (prompt-major), plus what produced them."""

    images: list[GeneratedImage]
    request: ResolvedRequest
    scheduler: str | None
    model_name: str
    model_digest: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return [img.seed for img in self.images]

    def recipe(self, index: int) -> dict[str, Any]:
        """JSON recipe of image ``index``: a one-image request with that image's own seed."""
        img = self.images[index]
        single = self.request.model_copy(update={
            "prompt": img.prompt,
            "negative_prompt": img.negative_prompt,
            "num_images_per_prompt": 1,
            "seed": img.seed,
            "scheduler": self.scheduler,
        })
        return {
            "sdmaker_version": __version__,
            "model": self.model_name,
            "model_digest": self.model_digest,
            "request": single.model_dump(mode="json"),
        }

    def encode(self, index: int) -> bytes:
        """Image ``index`` in the request's format (PNG with its recipe embedded)."""
        return encode_image(self.images[index].image, fmt=self.request.format, quality=self.request.quality,
                            recipe=self.recipe(index))

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.request.format]


def _negatives(request: ResolvedRequest) -> list[str | None]:
    prompts = request.prompts
    neg = request.negative_prompt
    if neg is None:
        return [None] * len(prompts)
    if isinstance(neg, str):
        return [neg] * len(prompts)
    return list(neg)


def generate(model: LoadedModel, request: GenerateRequest, *, on_step: StepCallback | None = None) -> GenerationResult:
    """Generate the images of ``request`` with ``model``.

    Args:
        model: from :func:`~sdmaker.engine.load_model`.
        request: validated request; unset fields take the model's defaults, then the seed's.
        on_step: progress callback, called after every denoising step.

    Raises:
        InvalidRequestError: a field is invalid for this model (e.g. unknown scheduler).
        OutOfMemoryError: the device ran out of memory.
        EngineError: any other failure inside diffusers/torch.
    """
    resolved = request if isinstance(request, ResolvedRequest) else request.resolve(model.defaults)
    if resolved.deep_cache_interval > 1:  # only sdmaker's own loop can reuse UNet features across steps
        from sdmaker.engine._loop import generate_fast

        return generate_fast(model, resolved, on_step=on_step)
    pipe = model.pipeline
    seeds = resolved.image_seeds()
    # CPU generators make the noise identical on CPU and CUDA for the same seed.
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    negatives = _negatives(resolved)
    total = resolved.num_inference_steps

    def _callback(pipe_: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            # Some samplers run more UNet calls than requested steps (PNDM's warm-up): report the real count.
            on_step(step + 1, int(getattr(pipe_, "num_timesteps", total)))
        return kwargs

    started = time.perf_counter()
    with model.lock:
        base_scheduler = pipe.scheduler
        scheduler = make_scheduler(resolved.scheduler, base_scheduler.config) if resolved.scheduler else \
            type(base_scheduler).from_config(base_scheduler.config)
        pipe.scheduler = scheduler
        try:
            with torch.inference_mode():
                out = pipe(
                    prompt=resolved.prompts,
                    negative_prompt=None if resolved.negative_prompt is None else negatives,
                    height=resolved.height,
                    width=resolved.width,
                    num_inference_steps=total,
                    guidance_scale=resolved.guidance_scale,
                    num_images_per_prompt=resolved.num_images_per_prompt,
                    generator=generators,
                    output_type="pil",
                    callback_on_step_end=_callback,
                )
        except torch.OutOfMemoryError as exc:
            raise OutOfMemoryError(
                f"out of memory generating {len(seeds)} image(s) at {resolved.width}x{resolved.height}; "
                "ask for fewer images or a smaller size", model=model.name) from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise OutOfMemoryError(f"out of memory: {exc}", model=model.name) from exc
            raise EngineError(f"generation failed: {exc}", model=model.name) from exc
        finally:
            pipe.scheduler = base_scheduler
    elapsed = time.perf_counter() - started
    per_prompt = resolved.num_images_per_prompt
    images = [
        GeneratedImage(image=img, seed=seeds[i], prompt=resolved.prompts[i // per_prompt],
                       negative_prompt=negatives[i // per_prompt], index=i)
        for i, img in enumerate(out.images)
    ]
    logger.info("generated %d image(s) %dx%d, %d steps in %.2fs", len(images), resolved.width, resolved.height,
                total, elapsed)
    return GenerationResult(
        images=images,
        request=resolved,
        scheduler=resolved.scheduler or scheduler_name_of(scheduler),
        model_name=model.name,
        model_digest=model.digest,
        timings={"total_s": elapsed, "per_step_s": elapsed / max(total, 1)},
    )
