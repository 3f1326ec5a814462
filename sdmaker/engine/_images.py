"""Image encoding and the PNG recipe.

A PNG written by sdmaker embeds its full recipe (prompt, every parameter, its own seed, scheduler,
model name and digest, sdmaker version) in an ``iTXt`` chunk named ``sdmaker``, so the image alone is
enough to regenerate it (``sdmaker generate --from image.png``).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from sdmaker.errors import InvalidRequestError

__all__ = ["RECIPE_KEY", "encode_image", "encode_image_base64", "read_recipe", "MIME_TYPES"]

RECIPE_KEY = "sdmaker"
MIME_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def encode_image(image: Image.Image, *, fmt: str = "jpeg", quality: int = 90,
                 recipe: dict[str, Any] | None = None) -> bytes:
    """Encode ``image`` as ``fmt``; PNGs carry ``recipe`` as JSON metadata."""
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if recipe is not None:
            info.add_itxt(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise InvalidRequestError(f"format={fmt!r}: not supported (allowed: jpeg, png, webp)",
                                  field="format", value=fmt, allowed="jpeg, png, webp")
    return buf.getvalue()


def encode_image_base64(image: Image.Image, **kwargs: Any) -> str:
    """Base64 text of :func:`encode_image` (the seed's ``generated_images`` entries)."""
    return base64.b64encode(encode_image(image, **kwargs)).decode("ascii")


def read_recipe(source: Path | bytes) -> dict[str, Any]:
    """The recipe embedded in an sdmaker PNG; raises :class:`InvalidRequestError` when there is none."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        text = img.info.get(RECIPE_KEY) if hasattr(img, "info") else None
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read image {source if isinstance(source, Path) else '<bytes>'}: {exc}",
                                  field="from") from exc
    if not text:
        raise InvalidRequestError(
            "this image has no sdmaker recipe (only PNGs written by sdmaker carry one)", field="from"
        )
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the embedded recipe is not valid JSON: {exc}", field="from") from exc
    if not isinstance(recipe, dict) or "request" not in recipe:
        raise InvalidRequestError("the embedded recipe has no 'request' entry", field="from")
    return recipe
