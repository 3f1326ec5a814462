"""What a generation returns: :class:`GenerationResult` (images, seeds, recipe, encoding).

Kept apart from the loop so that the loop, ``generate`` and the step batcher all build and return
the same type without importing one another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sdmaker import __version__
from sdmaker.engine._images import MIME_TYPES, encode_image
from sdmaker.schema import PROGRESS_FIELDS, ResolvedRequest, decode_input_image

__all__ = ["INPUT_IMAGE_FIELDS", "GeneratedImage", "GenerationResult", "StepCallback", "input_digests", "negatives_of"]

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
    """Images of one request, in output order (prompt-major), plus what produced them.

    ``arrays`` holds the same images as floats in [0, 1] (NHWC) before 8-bit rounding, so tests and
    benchmarks can compare runs more finely than one pixel level.
    """

    images: list[GeneratedImage]
    request: ResolvedRequest
    scheduler: str | None
    model_name: str
    model_digest: str
    timings: dict[str, float] = field(default_factory=dict)
    arrays: np.ndarray | None = field(default=None, repr=False)
    dtype: str | None = None
    tuned: bool = False
    #: the LoRA adapters applied: ``{"name", "scale", "digest"}`` (digest: sha256 of the adapter file)
    adapters: list[dict[str, Any]] = field(default_factory=list)

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
        recipe: dict[str, Any] = {
            "sdmaker_version": __version__,
            "model": self.model_name,
            "model_digest": self.model_digest,
            # progress fields never change an image; input images are recorded by digest, not by their bytes
            "request": single.model_dump(mode="json", exclude={*PROGRESS_FIELDS, *INPUT_IMAGE_FIELDS}),
        }
        inputs = input_digests(self.request)
        if inputs:
            recipe["inputs"] = inputs
        if self.dtype is not None:  # precision is a load-time choice, not a request field: recorded beside it
            recipe["dtype"] = self.dtype
        if not recipe["request"].get("loras"):
            recipe["request"].pop("loras", None)  # no adapters: the recipe of a plain request, as before
        if self.adapters:  # which adapter files, exactly: a name alone may be re-imported with other weights
            recipe["adapters"] = [dict(a) for a in self.adapters]
        if self.tuned:  # the unset fields came from the model's tuned defaults (``sdmaker model tune``)
            recipe["tuned_defaults"] = True
        return recipe

    def encode(self, index: int) -> bytes:
        """Image ``index`` in the request's format (PNG with its recipe embedded)."""
        return encode_image(self.images[index].image, fmt=self.request.format, quality=self.request.quality,
                            recipe=self.recipe(index))

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.request.format]


#: Request fields that carry input images: the recipe records their sha256 digests instead (``inputs``).
INPUT_IMAGE_FIELDS: tuple[str, ...] = ("image", "mask_image")


def input_digests(request: ResolvedRequest) -> dict[str, str]:
    """``{"image_sha256": ..., "mask_image_sha256": ...}`` of the request's input images (the decoded bytes)."""
    out: dict[str, str] = {}
    for name in INPUT_IMAGE_FIELDS:
        value = getattr(request, name, None)
        if value is not None:
            out[f"{name}_sha256"] = hashlib.sha256(decode_input_image(value, name)).hexdigest()
    return out


def negatives_of(request: ResolvedRequest) -> list[str | None]:
    """The negative prompt of each of ``request``'s prompts (None where there is none)."""
    prompts = request.prompts
    neg = request.negative_prompt
    if neg is None:
        return [None] * len(prompts)
    if isinstance(neg, str):
        return [neg] * len(prompts)
    return list(neg)
