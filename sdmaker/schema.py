"""The one generation request schema, shared by the CLI, the server and the client.

This module imports pydantic only (no torch), so ``sdmaker.client`` and the CLI load it cheaply.
Constraints are declared once, on the fields; :func:`parse_request` turns pydantic's errors into an
:class:`~sdmaker.errors.InvalidRequestError` that names the field, the value and the allowed range.
Numbers are strict: an integer field takes a JSON integer only (not ``"64"``, ``true`` or ``64.0``), and
an error quotes at most a few hundred characters of the input, however large it was.

Everything else that lists request fields derives from :attr:`GenerateRequest.model_fields` through
:func:`request_fields` (the client's ``generate``, the CLI's options), so a new field appears everywhere
at once. The wire forms the daemon and the worker accept are parsed here too, by one function each:
:func:`parse_json_body` (bytes to JSON, as the worker decodes them) and :func:`request_from_payload`
(the seed's JSON, a GenerateRequest, or the toolkit's ``{"inputs", "parameters"}``).

Field defaults equal the seed article's (512×512, 50 steps, guidance 7.5, one image). Fields left
unset (``None``) may instead take the model's own recommended defaults (a model trained at 64×64
declares so in its store manifest); :meth:`GenerateRequest.resolve` applies them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from sdmaker.errors import EXCERPT_CHARS, InvalidRequestError, excerpt, utf8_safe

__all__ = [
    "FORMATS",
    "INPUT_IMAGE_FORMATS",
    "LIMITS",
    "LoraRef",
    "STRENGTH_DEFAULTS",
    "SCHEDULERS",
    "FieldSpec",
    "GenerateRequest",
    "ImageFormat",
    "PREVIEWS",
    "PROGRESS_FIELDS",
    "PreviewKind",
    "ResolvedRequest",
    "SchedulerName",
    "body_text",
    "content_charset",
    "IMAGE_REFERENCE_SCHEMES",
    "decode_input_image",
    "image_reference_scheme",
    "input_image_info",
    "parse_json_body",
    "parse_request",
    "payload_from_csv",
    "request_fields",
    "request_from_body",
    "request_from_payload",
]

SchedulerName = Literal["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc", "lms", "heun", "ddpm"]
SCHEDULERS: tuple[str, ...] = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc", "lms", "heun", "ddpm")
ImageFormat = Literal["jpeg", "png", "webp"]
PreviewKind = Literal["none", "approx", "vae"]
PREVIEWS: tuple[str, ...] = ("none", "approx", "vae")
#: Fields that change what is reported while a request runs, never its images (left out of recipes).
PROGRESS_FIELDS: tuple[str, ...] = ("preview", "preview_every")
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
    "preview_every_max": 500,
    "loras_max": 8,
    "lora_scale_max": 4.0,
    "input_image_side_max": 2048,  # an input image (image, mask_image): at most size_max per side
}

#: Default ``strength`` when ``image`` is given: diffusers' own defaults (img2img 0.8, inpainting 1.0).
STRENGTH_DEFAULTS: dict[str, float] = {"img2img": 0.8, "inpaint": 1.0}
#: Input image formats accepted in ``image`` and ``mask_image``.
INPUT_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
#: References an ``image``/``mask_image`` may be instead of base64, on asynchronous invocations and batch transform
#: jobs only: the daemon fetches them before the request reaches a worker (``sdmaker.serving.daemon._image_refs``).
IMAGE_REFERENCE_SCHEMES: tuple[str, ...] = ("s3", "http", "https")

#: The seed article's defaults, used for any field neither the request nor the model sets.
SEED_DEFAULTS: dict[str, Any] = {
    "height": 512,
    "width": 512,
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "num_images_per_prompt": 1,
}

_Prompt = str | list[str]


class LoraRef(BaseModel):
    """One LoRA adapter a request asks for: a store name (``sdmaker model import``) and its weight.

    ``scale`` multiplies the adapter's low-rank delta (1.0 = as trained, 0 = off, negative = away from it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, description="Store name of the LoRA adapter.")
    scale: float = Field(default=1.0, ge=-LIMITS["lora_scale_max"], le=LIMITS["lora_scale_max"], strict=True,
                         description="Weight of the adapter's delta.")

    @field_validator("scale", mode="before")
    @classmethod
    def _finite_scale(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


def _lora_entry(item: Any) -> Any:
    """``"name"`` or ``"name:scale"`` (the CLI's ``--lora``) as ``{"name", "scale"}``; anything else unchanged."""
    if not isinstance(item, str):
        return item
    name, sep, scale = item.rpartition(":")
    if not sep:
        return {"name": item}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise ValueError(f"{item!r}: the scale after ':' must be a number (NAME or NAME:SCALE)") from None


class GenerateRequest(BaseModel):
    """A text-to-image request. Unknown fields are rejected (a typo must not be silently ignored).

    Numeric fields are strict (``strict=True``): JSON integers for integer fields, JSON numbers for
    ``guidance_scale``; strings, booleans and (for integers) floats are refused, not coerced.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: _Prompt = Field(description="Text prompt, or a list of prompts (one batch).")
    negative_prompt: _Prompt | None = Field(
        default=None, description="What to avoid; a string for all prompts or a list of the same length."
    )
    height: int | None = Field(
        default=None, ge=LIMITS["size_min"], le=LIMITS["size_max"], multiple_of=8, strict=True,
        description="Image height in pixels (multiple of 8). Default: the model's, else 512.",
    )
    width: int | None = Field(
        default=None, ge=LIMITS["size_min"], le=LIMITS["size_max"], multiple_of=8, strict=True,
        description="Image width in pixels (multiple of 8). Default: the model's, else 512.",
    )
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=LIMITS["steps_max"], strict=True, description="Denoising steps. Default: the model's, else 50."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=LIMITS["guidance_max"], strict=True,
        description="Classifier-free guidance scale; <= 1 disables guidance. Default: the model's, else 7.5.",
    )
    num_images_per_prompt: int | None = Field(
        default=None, ge=1, le=LIMITS["images_per_prompt_max"], strict=True, description="Images per prompt. Default 1."
    )
    seed: int | None = Field(
        default=None, ge=0, le=LIMITS["seed_max"], strict=True,
        description="Base seed; image i gets seed+i. Random when unset (the seeds used are reported back).",
    )
    scheduler: SchedulerName | None = Field(default=None, description="Sampler; default: the model's own.")
    deep_cache_interval: int | None = Field(
        default=None, ge=0, le=LIMITS["deep_cache_max"], strict=True,
        description="DeepCache: run the full UNet every N steps and reuse its deep features in between "
                    "(0 or 1 = off). Default: the model's (on only where its eval showed no loss), else off.",
    )
    loras: list[LoraRef] | None = Field(
        default=None,
        description=f"LoRA adapters to apply, each {{name, scale}} (at most {LIMITS['loras_max']}; scale "
                    f"-{LIMITS['lora_scale_max']:g}..{LIMITS['lora_scale_max']:g}, default 1). Requests with different "
                    "adapters still share UNet calls. On the command line: NAME or NAME:SCALE.",
    )
    format: ImageFormat = Field(default="jpeg", description="Output image format (the seed returns JPEG).")
    quality: int = Field(default=90, ge=1, le=100, strict=True, description="JPEG/WebP quality.")
    preview: PreviewKind = Field(
        default="none",
        description="Preview images in the progress events: none; approx (a linear latent-to-RGB map, next to "
                    "free); vae (a full VAE decode, costs about one decode per preview). Images are unchanged.",
    )
    preview_every: int = Field(
        default=0, ge=0, le=LIMITS["preview_every_max"], strict=True,
        description="A preview every N steps (0 = auto: every step for approx, about 4 per run for vae).",
    )

    image: str | None = Field(
        default=None,
        description="Input image (base64 PNG/JPEG/WebP) for image-to-image, or inpainting with mask_image. "
                    "width/height default to its size (rounded down to a multiple of 8); given, it is resized to them. "
                    "Asynchronous and batch transform requests may give an s3:// or allowed http(s):// reference.",
    )
    mask_image: str | None = Field(
        default=None,
        description="Inpainting mask (base64 PNG/JPEG/WebP, the image's size): white = repaint, black = keep. "
                    "Pixels outside the mask come back unchanged. A reference, as for image.",
    )
    strength: float | None = Field(
        default=None, ge=0.0, le=1.0, strict=True,
        description="How much of the input image is repainted (0..1, with image only): the steps actually run are "
                    "int(num_inference_steps x strength). Default 0.8 (image-to-image), 1.0 (inpainting).",
    )

    @field_validator("image", "mask_image")
    @classmethod
    def _check_input_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            input_image_info(value, info.field_name or "image")
        return value

    @field_validator("strength")
    @classmethod
    def _finite_strength(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

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
                _check_text(item)
        elif isinstance(value, str):
            if len(value) > LIMITS["prompt_chars_max"]:
                raise ValueError(f"must be at most {LIMITS['prompt_chars_max']} characters, got {len(value)}")
            _check_text(value)
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _check_loras(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            raise ValueError("must be a list of {name, scale} objects")
        if len(value) > LIMITS["loras_max"]:
            raise ValueError(f"at most {LIMITS['loras_max']} adapters per request, got {len(value)}")
        entries = [_lora_entry(item) for item in value]
        names = [e.get("name") for e in entries if isinstance(e, dict)]
        twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
        if twice:
            raise ValueError(f"adapter {twice[0]!r} is listed twice; give each adapter once with its scale")
        return entries or None

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
        self._check_edit()
        return self

    def _check_edit(self) -> None:
        """The image-to-image / inpainting fields: together, of matching sizes, giving at least one step."""
        if self.image is None:
            for name in ("mask_image", "strength"):
                if getattr(self, name) is not None:
                    raise InvalidRequestError(f"{name} needs an input image: give image too", field=name,
                                              allowed="only with image")
            return
        width, height = input_image_info(self.image)
        if self.mask_image is not None:
            mask_size = input_image_info(self.mask_image, "mask_image")
            if mask_size != (width, height):
                raise InvalidRequestError(
                    f"mask_image is {mask_size[0]}x{mask_size[1]} but image is {width}x{height}: they must match",
                    field="mask_image", value=f"{mask_size[0]}x{mask_size[1]}", allowed=f"{width}x{height}")
        if self.width is None or self.height is None:  # the output size defaults to the image's
            w, h = self.width or width // 8 * 8, self.height or height // 8 * 8
            if min(w, h) < LIMITS["size_min"] or w * h > LIMITS["pixels_max"]:
                raise InvalidRequestError(
                    f"image is {width}x{height}: as the output size that is outside {LIMITS['size_min']}.."
                    f"{LIMITS['size_max']} per side / {LIMITS['pixels_max']} pixels; give width and height to "
                    "resize it", field="image", value=f"{width}x{height}")
        strength = self.edit_strength
        steps = self.num_inference_steps
        if steps is not None and strength is not None and int(steps * strength) < 1:
            raise InvalidRequestError(
                f"strength={strength} x num_inference_steps={steps} runs no step (int({steps} x {strength}) = 0); "
                "raise strength or the steps", field="strength", value=strength)

    @property
    def edit_kind(self) -> str | None:
        """``txt2img`` is None; ``img2img`` with an image, ``inpaint`` with an image and a mask."""
        if self.image is None:
            return None
        return "inpaint" if self.mask_image is not None else "img2img"

    @property
    def edit_strength(self) -> float | None:
        """The strength the engine runs with: the request's, else the kind's default; None for text-to-image."""
        kind = self.edit_kind
        if kind is None:
            return None
        return self.strength if self.strength is not None else STRENGTH_DEFAULTS[kind]

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def resolve(self, model_defaults: dict[str, Any] | None = None, *, seed: int | None = None) -> ResolvedRequest:
        """Fill unset fields from the model's defaults, then the seed's; pick a seed if none was given."""
        defaults = {**SEED_DEFAULTS, **(model_defaults or {})}
        data = self.model_dump()
        if data["image"] is not None:  # an input image sets the output size, before the model's defaults
            width, height = input_image_info(data["image"])
            data["width"] = data["width"] or width // 8 * 8
            data["height"] = data["height"] or height // 8 * 8
            data["strength"] = self.edit_strength
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
    """A request with every numeric field set (what the engine runs and what a PNG recipe records).

    Not strict, unlike :class:`GenerateRequest`: it is built from an already validated request plus the
    model's own defaults (``sdmaker.json``), never from a client's JSON.
    """

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


def image_reference_scheme(value: str) -> str | None:
    """``s3``/``http``/``https`` when ``value`` is an image reference (``s3://bucket/key``, a URL), else None."""
    head = value[:8].strip().lower()
    for scheme in IMAGE_REFERENCE_SCHEMES:
        if head.startswith(scheme + "://"):
            return scheme
    return None


def decode_input_image(value: str, field: str = "image") -> bytes:
    """The bytes of a base64 input image (a ``data:image/...;base64,`` prefix is accepted); 400 naming ``field``.

    A reference (``s3://``, ``http(s)://``) gets a 400 that says where references work: only the daemon's
    asynchronous and batch transform paths fetch them (a synchronous worker never makes network calls on a
    caller's behalf), and those replace them with base64 before the request is validated here.
    """
    import base64
    import binascii

    if image_reference_scheme(value) is not None:
        raise InvalidRequestError(
            f"{field} is a reference ({excerpt(value.strip())}): references (s3://, http(s)://) are accepted only by "
            "asynchronous invocations (InvokeEndpointAsync) and batch transform jobs, which fetch them first; here "
            "send the image's bytes base64-encoded", field=field, value=excerpt(value),
            allowed="base64 PNG/JPEG/WebP (references: async and transform only)")
    text = value.strip()
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field} is not base64 text: send the PNG/JPEG file's bytes base64-encoded",
                                  field=field, value=excerpt(value)) from None


def input_image_info(value: str, field: str = "image") -> tuple[int, int]:
    """``(width, height)`` of a base64 input image, read from its header only (cheap: no pixel decoding).

    Raises :class:`InvalidRequestError` naming ``field`` for bytes that are not a PNG/JPEG/WebP image or an
    image over :data:`LIMITS` (``input_image_side_max`` per side).
    """
    import PIL.Image

    data = decode_input_image(value, field)
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
    except (OSError, ValueError, PIL.Image.DecompressionBombError):
        raise InvalidRequestError(f"{field} is not a PNG, JPEG or WebP image: send the file's bytes base64-encoded",
                                  field=field, value=excerpt(value)) from None
    if fmt not in INPUT_IMAGE_FORMATS:
        raise InvalidRequestError(f"{field} is a {fmt} image: send PNG, JPEG or WebP", field=field, value=fmt,
                                  allowed=", ".join(INPUT_IMAGE_FORMATS))
    side = LIMITS["input_image_side_max"]
    if max(size) > side or min(size) < 1:
        raise InvalidRequestError(f"{field} is {size[0]}x{size[1]}: at most {side} pixels per side", field=field,
                                  value=f"{size[0]}x{size[1]}", allowed=f"1..{side} per side")
    return size


def _random_seed() -> int:
    import secrets

    return secrets.randbelow(2**32)


def _check_text(text: str) -> None:
    """Refuse text that is not valid Unicode (JSON's ``"\\ud800"`` decodes to a lone surrogate).

    The tokenizer and every UTF-8 encoder downstream would fail on it much later, as a model error.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode text: lone surrogate {text[exc.start]!r} at index {exc.start}; "
                         "send UTF-8 text (in JSON, a \\ud800-\\udfff escape must be one half of a pair)") from None


# --- the fields, for the CLI and the client ------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One request field as the CLI and the client present it, derived from :attr:`GenerateRequest.model_fields`.

    ``type`` is the scalar Python type (``str``, ``int`` or ``float``); ``multiple`` says a list of them
    is also accepted (``prompt``, ``negative_prompt``); ``choices`` lists a closed set (``scheduler``).
    ``default`` is the schema's (``None``: the model's own default applies); ``minimum``/``maximum``/
    ``multiple_of`` are the limits a value is checked against, ``allowed`` says them in words.

    Example, a typer option per field::

        for spec in request_fields():
            print(spec.option, spec.type.__name__, spec.default, spec.allowed, spec.description)
    """

    name: str
    type: type
    required: bool
    default: Any
    description: str
    multiple: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None

    @property
    def option(self) -> str:
        """The CLI option name: ``--num-inference-steps``."""
        return "--" + self.name.replace("_", "-")

    @property
    def allowed(self) -> str | None:
        """The limits in words, as error messages quote them: ``"64..2048, multiple of 8"``."""
        parts: list[str] = []
        if self.minimum is not None or self.maximum is not None:
            lo = self.minimum if self.minimum is not None else "-inf"
            hi = self.maximum if self.maximum is not None else "inf"
            parts.append(f"{lo}..{hi}")
        if self.multiple_of is not None:
            parts.append(f"multiple of {self.multiple_of}")
        if self.choices:
            parts.append("one of " + ", ".join(self.choices))
        if self.name == "loras":
            parts.append(f"a list of up to {LIMITS['loras_max']} {{name, scale}} (NAME or NAME:SCALE), scale "
                         f"-{LIMITS['lora_scale_max']:g}..{LIMITS['lora_scale_max']:g}")
        elif self.multiple:
            parts.append(f"a string or a list of up to {LIMITS['prompts_max']} strings")
        return ", ".join(parts) or None


def _field_spec(name: str, info: Any) -> FieldSpec:
    scalar: type = str
    multiple = False
    choices: tuple[str, ...] | None = None
    for arg in _flatten(info.annotation):
        if arg is type(None):
            continue
        if typing.get_origin(arg) is Literal:
            choices = tuple(str(c) for c in typing.get_args(arg))
        elif typing.get_origin(arg) is list:
            multiple = True
        elif isinstance(arg, type):
            scalar = arg
    limits: dict[str, Any] = {}
    for meta in info.metadata:
        for key in ("ge", "le", "multiple_of"):
            if getattr(meta, key, None) is not None:
                limits[key] = getattr(meta, key)
    required = info.is_required()
    return FieldSpec(name=name, type=scalar, required=required, default=None if required else info.default,
                     description=info.description or "", multiple=multiple, choices=choices,
                     minimum=limits.get("ge"), maximum=limits.get("le"), multiple_of=limits.get("multiple_of"))


def _flatten(annotation: Any) -> list[Any]:
    """``int | None`` -> ``[int, None]``; ``Literal[...] | None`` -> ``[Literal[...], None]``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _flatten(arg)]
    return [annotation]


def request_fields(cls: type[GenerateRequest] | None = None) -> list[FieldSpec]:
    """Every field of the request schema, in declaration order (``prompt`` first): one source for options."""
    model = cls or GenerateRequest
    return [_field_spec(name, info) for name, info in model.model_fields.items()]


def _describe_allowed(field: str) -> str | None:
    info = GenerateRequest.model_fields.get(field)
    return _field_spec(field, info).allowed if info is not None else None


# --- validation ------------------------------------------------------------------------------------

#: How many of pydantic's errors an :class:`InvalidRequestError` lists (a body may hold thousands).
_ERRORS_LISTED = 10

_JSON_TYPES = {bool: "a boolean", str: "a string", float: "a float (64.0, 1e2 and -0.0 are floats)", int: "an integer",
               list: "an array", dict: "an object", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _field_name(part: Any) -> str:
    """A field name from an error location, short and printable (an unknown key may be megabytes long)."""
    text = utf8_safe(str(part))
    return text if len(text) <= 100 else text[:100] + "..."


def _message(error: Any) -> str:
    kind = error.get("type")
    if kind == "int_type":
        return f"must be an integer, got {_json_type(error.get('input'))}"
    if kind == "float_type":
        return f"must be a number, got {_json_type(error.get('input'))}"
    if kind == "extra_forbidden" and len(error.get("loc", ())) > 1:
        return "unknown field; allowed fields: " + ", ".join(LoraRef.model_fields)
    if kind == "extra_forbidden":
        return "unknown field; allowed fields: " + ", ".join(GenerateRequest.model_fields)
    msg = utf8_safe(str(error.get("msg", "invalid value")))
    return msg if len(msg) <= 2 * EXCERPT_CHARS else msg[:2 * EXCERPT_CHARS] + "..."


def _echo(value: Any) -> Any:
    """The offending value for an error's JSON fields: itself when small and JSON-safe, else an excerpt."""
    if value is None or isinstance(value, (bool, int)) and abs(value) < 2**64:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= EXCERPT_CHARS and utf8_safe(value) == value:
        return value
    return excerpt(value)


def parse_request(data: Any, *, cls: type[GenerateRequest] = GenerateRequest) -> Any:
    """Validate ``data`` (a dict) into ``cls``; raise :class:`InvalidRequestError` naming the first bad field.

    The error quotes the value (at most a few hundred characters of it) and the allowed range, and lists
    up to ten of pydantic's errors under ``errors``.
    """
    if not isinstance(data, dict):
        raise InvalidRequestError(
            f"request body must be a JSON object, got {type(data).__name__}", field=None, value=None
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc = list(first.get("loc", ()))
        # pydantic reports union members as extra loc parts (e.g. "prompt.str"); the field is the first.
        field = _field_name(loc[0]) if loc else None
        value = first.get("input")
        raised = (first.get("ctx") or {}).get("error")
        # a check that names its own field (the edit fields) keeps its message and field
        if isinstance(raised, InvalidRequestError) and raised.field is not None and field in (None, raised.field):
            raise InvalidRequestError(raised.message, field=raised.field, value=raised.value,
                                      allowed=raised.allowed) from None
        allowed = _describe_allowed(field) if field else None
        if field == "loras" and len(loc) >= 2 and isinstance(loc[1], int):  # name the entry: loras[1].scale
            field = f"loras[{loc[1]}]" + "".join(f".{_field_name(p)}" for p in loc[2:3])
        msg = _message(first)
        text = f"{field}={excerpt(value)}: {msg}" if field else msg
        if allowed:
            text += f" (allowed: {allowed})"
        listed = [{"field": ".".join(_field_name(p) for p in e.get("loc", ())), "message": _message(e)}
                  for e in errors[:_ERRORS_LISTED]]
        if len(errors) > _ERRORS_LISTED:
            listed.append({"field": "", "message": f"... and {len(errors) - _ERRORS_LISTED} more errors"})
        raise InvalidRequestError(text, field=field, value=_echo(value), allowed=allowed, errors=listed) from None


# --- wire forms: the daemon and the worker parse bodies with these ---------------------------------


def content_charset(content_type: str | None) -> str:
    """The ``charset`` parameter of a Content-Type header (``text/plain; charset="latin-1"``), else UTF-8."""
    for part in (content_type or "").split(";")[1:]:
        key, _, val = part.partition("=")
        if key.strip().lower() == "charset" and val.strip():
            return val.strip().strip('"')
    return "utf-8"


#: Charsets a JSON or CSV body may declare: UTF-8 and its subset ASCII. The Hugging Face toolkit decodes
#: these bodies as UTF-8 whatever they declare (and refuses any ``; charset=`` parameter); sdmaker takes
#: a declared UTF-8 and refuses every other charset with a 400, the same at the daemon and the worker,
#: rather than guessing what UTF-16 or Latin-1 text a caller meant.
TEXT_CHARSETS = ("utf-8", "utf8", "us-ascii", "ascii")


def body_text(body: bytes | str, content_type: str | None = None) -> str:
    """A JSON or CSV request body as text: UTF-8, the only charset taken (:data:`TEXT_CHARSETS`).

    Raises:
        InvalidRequestError: another declared charset (field ``Content-Type``), or bytes that are not
            UTF-8 (field ``Body``, naming the first bad byte's offset).
    """
    if not isinstance(body, (bytes, bytearray, memoryview)):
        return body
    charset = content_charset(content_type)
    if charset.lower() not in TEXT_CHARSETS:
        raise InvalidRequestError(f"Content-Type charset {utf8_safe(charset[:40])!r} is not supported: send the body "
                                  "as UTF-8 (application/json or application/json; charset=utf-8)",
                                  field="Content-Type", value=utf8_safe(charset[:40]), allowed="utf-8")
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"Request body is not valid UTF-8 text: {exc.reason} at byte {exc.start}",
                                  field="Body") from None


def parse_json_body(body: bytes | str, content_type: str | None = None) -> Any:
    """Decode a JSON request body as the worker does (UTF-8, see :func:`body_text`).

    Every failure is an :class:`InvalidRequestError` (HTTP 400): a charset other than UTF-8, bytes that
    are not UTF-8, invalid JSON, and JSON nested too deeply for the parser (which would otherwise raise
    ``RecursionError`` and take the connection down).
    """
    text = body_text(body, content_type)
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidRequestError("Request body is not valid JSON: nested too deeply", field="Body") from None
    except ValueError as exc:
        raise InvalidRequestError(f"Request body is not valid JSON: {exc}", field="Body") from None


def payload_from_csv(text: str) -> dict[str, Any]:
    """A ``text/csv`` body as the Hugging Face toolkit decodes it (contract 2.6).

    The header row must name ``question``, ``context`` or ``inputs``; an ``inputs`` column becomes
    ``{"inputs": [...]}``, other columns ``{"inputs": [row dicts]}``.
    """
    lines = text.splitlines()
    if not lines or not any(h in lines[0].lower() for h in ("question", "context", "inputs")):
        raise InvalidRequestError(
            "You need to provide the correct CSV with Header columns to use it with the inference toolkit "
            "default handler.", field="Body")
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise InvalidRequestError(f"Request body is not valid CSV: {exc}", field="Body") from None
    if rows and "inputs" in rows[0]:
        return {"inputs": [row["inputs"] for row in rows]}
    return {"inputs": rows}


def request_from_payload(data: Any) -> GenerateRequest:
    """Validate a decoded body into a request: the seed's JSON, a GenerateRequest, or ``{"inputs", "parameters"}``."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {type(data).__name__}", field=None)
    data = dict(data)
    if "inputs" in data:
        if "prompt" in data:
            raise InvalidRequestError("give the prompt as 'inputs' (HF toolkit) or 'prompt', not both",
                                      field="inputs", value=None)
        params = data.pop("parameters", None)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"parameters must be a JSON object, got {type(params).__name__}",
                                      field="parameters", value=None)
        both = sorted(set(params) & set(data))
        if both:
            name = _field_name(both[0])
            raise InvalidRequestError(f"{name} is given both at the top level and in parameters",
                                      field=name, value=None)
        data = {"prompt": data.pop("inputs"), **data, **params}
    request: GenerateRequest = parse_request(data)
    return request


def request_from_body(body: bytes | str, content_type: str | None = None) -> GenerateRequest:
    """:func:`parse_json_body` then :func:`request_from_payload`: a raw JSON body to a validated request."""
    return request_from_payload(parse_json_body(body, content_type))
