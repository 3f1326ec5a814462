"""The one generation request schema, shared by the CLI, the server and the client.

This module imports pydantic only (no torch), so ``sdmaker.client`` and the CLI load it cheaply.
Constraints are declared once, on the fields; :func:`parse_request` turns pydantic's errors into an
:class:`~sdmaker.errors.InvalidRequestError` that names the field, the value and the allowed range.

Field defaults equal the seed article's (512×512, 50 steps, guidance 7.5, one image). Fields left
unset (``None``) may instead take the model's own recommended defaults (a model trained at 64×64
declares so in its store manifest); :meth:`GenerateRequest.resolve` applies them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdmaker.errors import InvalidRequestError

__all__ = [
    "FORMATS",
    "LIMITS",
    "SCHEDULERS",
    "GenerateRequest",
    "ImageFormat",
    "ResolvedRequest",
    "SchedulerName",
    "parse_request",
]

SchedulerName = Literal["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc", "lms", "heun", "ddpm"]
SCHEDULERS: tuple[str, ...] = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc", "lms", "heun", "ddpm")
ImageFormat = Literal["jpeg", "png", "webp"]
FORMATS: tuple[str, ...] = ("jpeg", "png", "webp")

#: Hard limits; a request outside them is rejected before any work is queued.
LIMITS: dict[str, Any] = {
    "size_min": 64,
    "size_max": 2048,
    "pixels_max": 1536 * 1536,
    "steps_max": 500,
    "guidance_max": 50.0,
    "images_per_prompt_max": 16,
    "prompts_max": 16,
    "images_total_max": 32,
    "prompt_chars_max": 4000,
    "seed_max": 2**63 - 1,
    "deep_cache_max": 10,
}

#: The seed article's defaults, used for any field neither the request nor the model sets.
SEED_DEFAULTS: dict[str, Any] = {
    "height": 512,
    "width": 512,
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "num_images_per_prompt": 1,
}

_Prompt = str | list[str]


class GenerateRequest(BaseModel):
    """A text-to-image request. Unknown fields are rejected (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: _Prompt = Field(description="Text prompt, or a list of prompts (one batch).")
    negative_prompt: _Prompt | None = Field(
        default=None, description="What to avoid; a string for all prompts or a list of the same length."
    )
    height: int | None = Field(
        default=None, ge=LIMITS["size_min"], le=LIMITS["size_max"], multiple_of=8,
        description="Image height in pixels (multiple of 8). Default: the model's, else 512.",
    )
    width: int | None = Field(
        default=None, ge=LIMITS["size_min"], le=LIMITS["size_max"], multiple_of=8,
        description="Image width in pixels (multiple of 8). Default: the model's, else 512.",
    )
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=LIMITS["steps_max"], description="Denoising steps. Default: the model's, else 50."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=LIMITS["guidance_max"],
        description="Classifier-free guidance scale; <= 1 disables guidance. Default: the model's, else 7.5.",
    )
    num_images_per_prompt: int | None = Field(
        default=None, ge=1, le=LIMITS["images_per_prompt_max"], description="Images per prompt. Default 1."
    )
    seed: int | None = Field(
        default=None, ge=0, le=LIMITS["seed_max"],
        description="Base seed; image i gets seed+i. Random when unset (the seeds used are reported back).",
    )
    scheduler: SchedulerName | None = Field(default=None, description="Sampler; default: the model's own.")
    deep_cache_interval: int | None = Field(
        default=None, ge=0, le=LIMITS["deep_cache_max"],
        description="DeepCache: run the full UNet every N steps and reuse its deep features in between "
                    "(0 or 1 = off). Default: the model's (on only where its eval showed no loss), else off.",
    )
    format: ImageFormat = Field(default="jpeg", description="Output image format (the seed returns JPEG).")
    quality: int = Field(default=90, ge=1, le=100, description="JPEG/WebP quality.")

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be an empty list")
            if len(value) > LIMITS["prompts_max"]:
                raise ValueError(f"at most {LIMITS['prompts_max']} prompts per request, got {len(value)}")
            for item in value:
                if not isinstance(item, str):
                    raise ValueError(f"list items must be strings, got {type(item).__name__}")
                if len(item) > LIMITS["prompt_chars_max"]:
                    raise ValueError(f"each prompt must be at most {LIMITS['prompt_chars_max']} characters")
        elif isinstance(value, str) and len(value) > LIMITS["prompt_chars_max"]:
            raise ValueError(f"must be at most {LIMITS['prompt_chars_max']} characters, got {len(value)}")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _check_batch(self) -> GenerateRequest:
        prompts = self.prompts
        if isinstance(self.negative_prompt, list) and len(self.negative_prompt) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(self.negative_prompt)} entries but prompt has {len(prompts)}; "
                "give one string for all prompts or a list of the same length"
            )
        total = len(prompts) * (self.num_images_per_prompt or 1)
        if total > LIMITS["images_total_max"]:
            raise ValueError(
                f"len(prompt) x num_images_per_prompt = {total} images; at most {LIMITS['images_total_max']}"
            )
        if self.height and self.width and self.height * self.width > LIMITS["pixels_max"]:
            raise ValueError(
                f"height x width = {self.height}x{self.width} exceeds {LIMITS['pixels_max']} pixels"
            )
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def resolve(self, model_defaults: dict[str, Any] | None = None, *, seed: int | None = None) -> ResolvedRequest:
        """Fill unset fields from the model's defaults, then the seed's; pick a seed if none was given."""
        defaults = {**SEED_DEFAULTS, **(model_defaults or {})}
        data = self.model_dump()
        for name in ("height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt"):
            if data[name] is None:
                data[name] = defaults[name]
        if data["scheduler"] is None:
            data["scheduler"] = defaults.get("scheduler")
        if data["deep_cache_interval"] is None:
            data["deep_cache_interval"] = int(defaults.get("deep_cache_interval") or 0)
        if data["seed"] is None:
            data["seed"] = seed if seed is not None else _random_seed()
        return parse_request(data, cls=ResolvedRequest)


class ResolvedRequest(GenerateRequest):
    """A request with every numeric field set (what the engine runs and what a PNG recipe records)."""

    height: int = Field(ge=LIMITS["size_min"], le=LIMITS["size_max"], multiple_of=8)
    width: int = Field(ge=LIMITS["size_min"], le=LIMITS["size_max"], multiple_of=8)
    num_inference_steps: int = Field(ge=1, le=LIMITS["steps_max"])
    guidance_scale: float = Field(ge=0.0, le=LIMITS["guidance_max"])
    num_images_per_prompt: int = Field(ge=1, le=LIMITS["images_per_prompt_max"])
    seed: int = Field(ge=0, le=LIMITS["seed_max"])
    deep_cache_interval: int = Field(default=0, ge=0, le=LIMITS["deep_cache_max"])

    def image_seeds(self) -> list[int]:
        """Seed of each output image, in output order (prompt-major): image i gets ``seed + i``.

        Each image's seed regenerates that image alone with ``num_images_per_prompt=1``.
        """
        total = len(self.prompts) * self.num_images_per_prompt
        return [(self.seed + i) % (LIMITS["seed_max"] + 1) for i in range(total)]


def _random_seed() -> int:
    import secrets

    return secrets.randbelow(2**32)


def _describe_allowed(field: str) -> str | None:
    info = GenerateRequest.model_fields.get(field)
    if info is None:
        return None
    parts: list[str] = []
    lo = hi = mult = None
    for meta in info.metadata:
        lo = getattr(meta, "ge", lo)
        hi = getattr(meta, "le", hi)
        mult = getattr(meta, "multiple_of", mult)
    if lo is not None or hi is not None:
        parts.append(f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
    if mult is not None:
        parts.append(f"multiple of {mult}")
    if field == "scheduler":
        parts.append("one of " + ", ".join(SCHEDULERS))
    if field == "format":
        parts.append("one of " + ", ".join(FORMATS))
    if field in ("prompt", "negative_prompt"):
        parts.append(f"a string or a list of up to {LIMITS['prompts_max']} strings")
    return ", ".join(parts) or None


def parse_request(data: Any, *, cls: type[GenerateRequest] = GenerateRequest) -> Any:
    """Validate ``data`` (a dict) into ``cls``; raise :class:`InvalidRequestError` naming the first bad field."""
    if not isinstance(data, dict):
        raise InvalidRequestError(
            f"request body must be a JSON object, got {type(data).__name__}", field=None, value=None
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc = [str(p) for p in first.get("loc", ())]
        # pydantic reports union members as extra loc parts (e.g. "prompt.str"); the field is the first.
        field = loc[0] if loc else None
        value = first.get("input")
        allowed = _describe_allowed(field) if field else None
        msg = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field; allowed fields: " + ", ".join(GenerateRequest.model_fields)
        shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else "<...>"
        text = f"{field}={shown}: {msg}" if field else msg
        if allowed:
            text += f" (allowed: {allowed})"
        simple = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")} for e in errors
        ]
        raise InvalidRequestError(text, field=field, value=value if _jsonable(value) else repr(value),
                                  allowed=allowed, errors=simple) from None


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) and not (
        isinstance(value, float) and not math.isfinite(value)
    )
