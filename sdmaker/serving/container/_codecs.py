"""Request decoders and response encoders of the Hugging Face inference toolkit (contract §2.6).

The tables map a media type to a function, exactly as ``decoder_encoder.py`` of
``sagemaker-huggingface-inference-toolkit`` 2.6.0 does: JSON, CSV (``inputs``/``question``/``context``
header), NPY, images (decoded to ``{"inputs": PIL.Image}``) and audio (``{"inputs": bytes}``) in;
JSON (numpy, datetime and PIL images made serialisable), CSV, NPY and images out.

One documented leniency: media-type *parameters* are ignored when choosing a codec, so
``application/json; charset=utf-8`` decodes as JSON (using its charset) instead of failing with
"Content type ... is not supported" as the toolkit does. Everything else the toolkit refuses is
refused here too, with its wording (:class:`~sdmaker.errors.UnsupportedFormatError`, HTTP 400).
"""

from __future__ import annotations

import base64
import csv
import datetime
import io
import json
from collections.abc import Callable
from typing import Any

from sdmaker.errors import InvalidRequestError, UnsupportedFormatError
from sdmaker.schema import content_charset

__all__ = [
    "ANY",
    "unsupported",
    "JSON",
    "MAX_INPUT_PIXELS",
    "TEXT_TYPES",
    "decode",
    "encode",
    "encode_json",
    "media_type",
    "resolve_accept",
    "to_text",
]

JSON = "application/json"
CSV = "text/csv"
NPY = "application/x-npy"
ANY = "*/*"
X_IMAGE = "image/x-image"
#: Bodies of these types reach handlers as ``str`` (the toolkit's ``UTF8_TYPES``).
TEXT_TYPES = (JSON, CSV)
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/tiff", "image/bmp", "image/gif", "image/webp", X_IMAGE)
#: Most pixels an input image may have (4096 x 4096). Checked from the header, before any pixel is decoded: a
#: 165 KB PNG of 17000 x 10000 pixels otherwise takes a worker to 1.4 GB (issue 11).
MAX_INPUT_PIXELS = 4096 * 4096
_AUDIO_TYPES = ("audio/x-flac", "audio/mpeg", "audio/wave", "audio/ogg", "audio/x-audio")


def media_type(value: str | None) -> str | None:
    """``"application/json; charset=utf-8"`` -> ``"application/json"`` (lower-cased, parameters dropped)."""
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def resolve_accept(accept: str | None) -> str:
    """Missing or ``*/*`` Accept means JSON (toolkit ``handle()``); any other value is kept verbatim."""
    if not accept or accept.strip() == ANY:
        return JSON
    return accept


def to_text(body: bytes, content_type: str | None) -> bytes | str:
    """Decode JSON/CSV bodies to ``str`` before the handler sees them, as the toolkit does."""
    if media_type(content_type) not in TEXT_TYPES:
        return body
    try:
        return body.decode(content_charset(content_type))
    except (UnicodeDecodeError, LookupError) as exc:
        raise InvalidRequestError(f"request body is not valid {content_charset(content_type)} text: {exc}",
                                  field="body") from None


def unsupported(content_type: str | None, field: str = "ContentType") -> UnsupportedFormatError:
    """The toolkit's ``UnsupportedFormatError`` text (sagemaker_inference ``errors.py``)."""
    return UnsupportedFormatError(
        f"Content type {content_type} is not supported by this framework.\n\n"
        "Please implement input_fn to to deserialize the request data or an output_fn to serialize the "
        "response. For more information, see the SageMaker Python SDK README.",
        field=field, value=content_type,
    )


# --- decoders -------------------------------------------------------------------------------------


def _decode_json(content: bytes | str) -> Any:
    try:
        return json.loads(content)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", field="body") from None


def _decode_csv(content: bytes | str) -> dict[str, Any]:
    text = content.decode("utf-8") if isinstance(content, bytes) else content
    lines = text.splitlines()
    if not lines or not any(h in lines[0].lower() for h in ("question", "context", "inputs")):
        raise InvalidRequestError(
            "You need to provide the correct CSV with Header columns to use it with the inference toolkit "
            "default handler.", field="body")
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and "inputs" in rows[0]:
        return {"inputs": [row["inputs"] for row in rows]}
    return {"inputs": rows}


def _decode_npy(content: bytes | str) -> Any:
    import numpy as np

    data = content.encode() if isinstance(content, str) else content
    return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle request bodies


def _decode_image(content: bytes | str) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    # PIL's own decompression-bomb guard too (it raises at 2x its limit): a format whose header lies is caught
    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
    try:
        image = Image.open(io.BytesIO(bytes(content)))  # type: ignore[arg-type]  # lazy: reads the header only
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise InvalidRequestError(
                f"input image is {width}x{height} = {width * height} pixels; the limit is {MAX_INPUT_PIXELS} "
                "pixels (4096x4096)", field="body", allowed=f"at most {MAX_INPUT_PIXELS} pixels")
        return {"inputs": image.convert("RGB")}
    except Image.DecompressionBombError as exc:
        raise InvalidRequestError(f"input image is too large ({exc}); the limit is {MAX_INPUT_PIXELS} pixels "
                                  "(4096x4096)", field="body", allowed=f"at most {MAX_INPUT_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequestError(f"request body is not a readable image: {exc}", field="body") from None


def _decode_audio(content: bytes | str) -> dict[str, Any]:
    return {"inputs": bytes(content) if isinstance(content, (bytes, bytearray)) else content.encode()}


_DECODERS: dict[str, Callable[[Any], Any]] = {
    JSON: _decode_json,
    CSV: _decode_csv,
    NPY: _decode_npy,
    **dict.fromkeys(_IMAGE_TYPES, _decode_image),
    **dict.fromkeys(_AUDIO_TYPES, _decode_audio),
}


def decode(content: bytes | str, content_type: str | None) -> Any:
    """Deserialize a request body by its Content-Type (parameters ignored); 400 for unknown types."""
    decoder = _DECODERS.get(media_type(content_type) or "")
    if decoder is None:
        raise unsupported(content_type)
    return decoder(content)


# --- encoders -------------------------------------------------------------------------------------


class _JSONEncoder(json.JSONEncoder):
    """numpy scalars/arrays, datetimes and PIL images (base64 PNG) become JSON, as in the toolkit."""

    def default(self, obj: Any) -> Any:
        from PIL import Image

        if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
            return obj.item()
        if hasattr(obj, "tolist"):
            return obj.tolist()
        if isinstance(obj, datetime.datetime):
            return str(obj)
        if isinstance(obj, Image.Image):
            buf = io.BytesIO()
            obj.save(buf, format="PNG")
            return base64.b64encode(buf.getvalue()).decode("utf-8")
        return super().default(obj)


def encode_json(content: Any) -> str:
    """Compact JSON, non-ASCII kept, NaN refused (the toolkit's ``encode_json``)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, cls=_JSONEncoder, separators=(",", ":"))


def _encode_csv(content: Any, _accept: str) -> str:
    rows = content if isinstance(content, list) else list(content)
    if not rows or not isinstance(rows[0], dict):
        raise InvalidRequestError("text/csv output needs a list of dicts from predict", field="Accept")
    out = io.StringIO()
    writer = csv.DictWriter(out, list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _encode_npy(content: Any, _accept: str) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, content)
    return buf.getvalue()


def _encode_image(image: Any, accept: str) -> bytes:
    fmt = "PNG" if accept == X_IMAGE else accept.split("/")[-1].upper()
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


_ENCODERS: dict[str, Callable[[Any, str], Any]] = {
    JSON: lambda content, _accept: encode_json(content),
    CSV: _encode_csv,
    NPY: _encode_npy,
    **dict.fromkeys(_IMAGE_TYPES, _encode_image),
}


def encode(content: Any, accept: str) -> Any:
    """Serialize a prediction for ``accept`` (parameters ignored); 400 for types without an encoder."""
    mt = media_type(accept) or ""
    encoder = _ENCODERS.get(mt)
    if encoder is None:
        raise unsupported(accept, field="Accept")
    return encoder(content, mt)
