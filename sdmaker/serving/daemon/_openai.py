"""The OpenAI Images API on the daemon: ``POST /v1/images/generations``, so apps that speak it work unchanged.

Point any OpenAI client at ``http://127.0.0.1:8765/v1`` (the key is the daemon's bearer token off
loopback; any string on loopback). Request fields:

=================  ==========================================================================================
``prompt``         required; the request schema's limits apply (:mod:`sdmaker.schema`)
``model``          an endpoint name, or a store model name (served by a managed endpoint, see
                   :mod:`._generate`). Omitted, or a name clients hard-code (``dall-e-2``, ``dall-e-3``,
                   ``gpt-image-*``): ``SDMAKER_OPENAI_MODEL`` (default ``mini``).
``n``              images (``num_images_per_prompt``), default 1
``size``           ``WIDTHxHEIGHT`` (each 64..2048, multiple of 8) or ``auto`` (the model's own size)
``quality``        steps relative to the model's default ``num_inference_steps`` (:data:`QUALITY_STEPS`):
                   ``low`` x0.5, ``auto``/``medium``/``standard`` x1, ``high``/``hd`` x2, ``xhigh`` x3,
                   ``max`` x4 (at most 500)
``response_format``  ``b64_json`` (default) or ``url``: a capability URL on this daemon
                   (``/v1/images/files/<random>.<ext>``), valid :data:`URL_TTL_S` seconds
``output_format``  ``png`` (default; carries the sdmaker recipe) | ``jpeg`` | ``webp``;
                   ``output_compression`` 0..100 sets JPEG/WebP quality
``stream``         ``true``: Server-Sent Events ``image_generation.partial_image`` (up to ``partial_images``,
                   0..3, from the job's ``preview`` events) then one ``image_generation.completed`` per image
``user``           accepted and logged (abuse tracking), like ``safety_identifier``
``background``     ``auto`` | ``opaque`` (``transparent`` is refused); ``style``, ``moderation`` accepted,
                   without effect
sdmaker extras     ``seed``, ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``scheduler``,
                   ``deep_cache_interval`` (``extra_body=`` in the OpenAI client); explicit steps win over
                   ``quality``
=================  ==========================================================================================

The answer is ``{"created", "data": [{"b64_json" | "url", "revised_prompt": null}], "output_format",
"quality", "size", "background", "usage"}``. ``usage`` counts tokens as OpenAI's image models do in
spirit only: ``input_tokens`` are the prompt's whitespace-separated words and ``output_tokens`` the
latent pixels generated (``images x (width/8) x (height/8) / 16``): sdmaker has no tokenizer in the
daemon and bills nothing.

``POST /v1/images/edits`` (``client.images.edit``) takes the same fields as multipart/form-data, plus:

=================  ==========================================================================================
``image``          required: one PNG/JPEG/WebP file (``image[]`` with one file is accepted too)
``mask``           optional PNG of the image's size. OpenAI's convention: where its alpha is transparent
                   (< 128) is repainted, opaque is kept. A mask without alpha is read as sdmaker's
                   ``mask_image``: white = repaint. No mask: the image's own transparent pixels are the
                   mask when it has any (as DALL-E 2), else the whole image is redrawn (image-to-image)
``strength``       sdmaker extra (0..1): how much is repainted; default 0.8 without a mask, 1.0 with one
=================  ==========================================================================================

``size`` defaults to the image's own size (``auto``); another size resizes the image. Outside the mask,
the answer's pixels are the input's, exactly.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and status codes (400 bad
input, 401 credentials, 404 unknown model, 413 body too large, 503 overloaded with ``Retry-After``, 500
the model failed, 504 timeout), so the OpenAI client raises its typed exceptions
(``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ...).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from sdmaker.config import Settings
from sdmaker.errors import (
    AuthenticationError,
    EndpointNotFoundError,
    EndpointNotReadyError,
    InvalidRequestError,
    InvocationFailedError,
    InvocationTimeoutError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    SdmakerError,
    utf8_safe,
)
from sdmaker.schema import LIMITS, SEED_DEFAULTS, GenerateRequest, request_from_payload
from sdmaker.serving._http import read_body
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._generate import Generated, generate, model_defaults, new_job_id, resolve_target
from sdmaker.serving.daemon._metrics import DaemonMetrics

__all__ = ["FILES_PREFIX", "QUALITY_STEPS", "URL_TTL_S", "add_openai_routes", "edits", "generations", "image_file",
           "is_openai_path", "openai_error_response"]

logger = logging.getLogger(__name__)

#: How long a ``response_format=url`` image stays downloadable.
URL_TTL_S = 3600
#: Path prefix of those images (public capability URLs: the name is 128 random bits).
FILES_PREFIX = "/v1/images/files/"
#: ``quality`` -> factor on the model's default number of denoising steps.
QUALITY_STEPS: dict[str, float] = {"low": 0.5, "auto": 1.0, "medium": 1.0, "standard": 1.0, "high": 2.0, "hd": 2.0,
                                   "xhigh": 3.0, "max": 4.0}
#: Names that clients hard-code; they mean ``settings.openai_model``.
_HARDCODED_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")
_OPENAI_FIELDS = {"prompt", "model", "n", "size", "quality", "response_format", "output_format",
                  "output_compression", "stream", "partial_images", "user", "background", "style", "moderation",
                  "safety_identifier"}
#: sdmaker's own fields a client may add (``extra_body``), passed to the request schema as they are.
_EXTRA_FIELDS = ("seed", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler",
                 "deep_cache_interval")
#: request-schema field -> the OpenAI parameter an error about it names
_PARAM_OF = {"num_images_per_prompt": "n", "height": "size", "width": "size", "format": "output_format",
             "quality": "output_compression", "mask_image": "mask"}
#: ``/v1/images/edits`` form fields that are not in the JSON API (``input_fidelity`` is accepted, without effect)
_EDIT_FIELDS = ("image", "image[]", "mask", "strength", "input_fidelity")
#: form fields (strings on the wire) -> the JSON type the JSON API's checks expect
_FORM_INTS = ("n", "output_compression", "partial_images", "seed", "num_inference_steps", "deep_cache_interval")
_FORM_FLOATS = ("guidance_scale", "strength")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


# -- errors ---------------------------------------------------------------------------------------------


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": utf8_safe(message[:1024]), "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def openai_error_response(exc: SdmakerError) -> JSONResponse:
    """An sdmaker error as OpenAI answers it: status, ``{"error": {message, type, param, code}}``."""
    headers = {"X-Sdmaker-Error-Code": exc.code}
    if isinstance(exc, AuthenticationError):
        return _error(401, exc.message, "invalid_request_error", None, "invalid_api_key", headers)
    if isinstance(exc, (ModelNotFoundError, EndpointNotFoundError)):
        return _error(404, exc.message, "invalid_request_error", "model", "model_not_found", headers)
    if isinstance(exc, PayloadTooLargeError):
        return _error(413, exc.message, "invalid_request_error", None, "request_too_large", headers)
    if isinstance(exc, InvalidRequestError):
        return _error(400, exc.message, "invalid_request_error", exc.field, "invalid_value", headers)
    if isinstance(exc, (QueueFullError, EndpointNotReadyError)):
        headers["Retry-After"] = str(exc.fields.get("retry_after", 1))
        return _error(503, exc.message, "server_error", None, "overloaded", headers)
    if isinstance(exc, InvocationTimeoutError):
        return _error(504, exc.message, "server_error", None, "timeout", headers)
    if isinstance(exc, InvocationFailedError):  # the model failed: a server error, not the caller's (424 elsewhere)
        return _error(500, exc.message, "server_error", None, "model_error", headers)
    if 400 <= exc.http_status < 500:
        return _error(exc.http_status, exc.message, "invalid_request_error", None, None, headers)
    return _error(500, exc.message if exc.http_status != 500 or exc.code != "ServingError" else
                  "The server had an error while processing your request.", "server_error", None, None, headers)


def _bad(message: str, param: str, value: Any = None) -> InvalidRequestError:
    return InvalidRequestError(message, field=param, value=value)


# -- the request ------------------------------------------------------------------------------------------


class _Options:
    """The OpenAI-only fields of one request, checked."""

    def __init__(self, body: dict[str, Any], settings: Settings) -> None:
        unknown = sorted(set(body) - _OPENAI_FIELDS - set(_EXTRA_FIELDS))
        if unknown:
            raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise _bad("model must be a non-empty string", "model")
        self.requested_model = model
        self.target = _target(model, settings)
        self.n = _int(body, "n", 1, 1, LIMITS["images_per_prompt_max"])
        size = body.get("size")
        if size is not None and not isinstance(size, str):
            raise _bad("size must be a string like '512x512' or 'auto'", "size")
        self.size = size or "auto"
        self.width: int | None = None
        self.height: int | None = None
        if self.size != "auto":
            w, sep, h = self.size.lower().partition("x")
            if not (sep and w.isdigit() and h.isdigit()):
                raise _bad(f"Invalid size {self.size!r}: use WIDTHxHEIGHT (e.g. 512x512) or 'auto'", "size", size)
            self.width, self.height = int(w), int(h)
        self.quality = _choice(body, "quality", tuple(QUALITY_STEPS), "auto")
        self.response_format = _choice(body, "response_format", ("b64_json", "url"), "b64_json")
        self.output_format = _choice(body, "output_format", ("png", "jpeg", "webp"), "png")
        self.compression = _int(body, "output_compression", 100, 0, 100)
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise _bad("stream must be a boolean", "stream")
        self.stream = bool(stream)
        self.partial_images = _int(body, "partial_images", 0, 0, 3)
        self.background = _choice(body, "background", ("auto", "opaque", "transparent"), "auto")
        if self.background == "transparent":
            raise _bad("background='transparent' is not supported: Stable Diffusion images are opaque",
                       "background", "transparent")
        _choice(body, "style", ("vivid", "natural"), "vivid")
        _choice(body, "moderation", ("auto", "low"), "auto")
        for key in ("user", "safety_identifier"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise _bad(f"{key} must be a string", key)
        self.user = body.get("safety_identifier") or body.get("user")


def _target(model: str | None, settings: Settings) -> str:
    if model is None or model.lower().startswith(_HARDCODED_PREFIXES):
        return settings.openai_model
    return model


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"Invalid value for '{key}': {value!r}; expected an integer in {lo}..{hi}", key, value)
    return value


def _choice(body: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(key)
    if value is None:
        return default
    if value not in allowed:
        raise _bad(f"Invalid value for '{key}': {value!r}; supported values are: {', '.join(allowed)}", key, value)
    return str(value)


def _schema_request(body: dict[str, Any], opts: _Options, defaults: dict[str, Any],
                    edit: dict[str, Any] | None = None) -> GenerateRequest:
    """The OpenAI request as the one request schema (which does the validation); ``edit``: image fields."""
    payload: dict[str, Any] = {"prompt": body.get("prompt"), "num_images_per_prompt": opts.n,
                               "format": opts.output_format, **(edit or {})}
    if "prompt" not in body:
        raise _bad("Missing required parameter: 'prompt'.", "prompt")
    if opts.width is not None:
        payload["width"], payload["height"] = opts.width, opts.height
    if opts.output_format in ("jpeg", "webp"):
        payload["quality"] = max(1, opts.compression)
    for key in _EXTRA_FIELDS:
        if body.get(key) is not None:
            payload[key] = body[key]
    if "num_inference_steps" not in payload and QUALITY_STEPS[opts.quality] != 1.0:
        base = int(defaults.get("num_inference_steps") or SEED_DEFAULTS["num_inference_steps"])
        payload["num_inference_steps"] = max(1, min(LIMITS["steps_max"], round(base * QUALITY_STEPS[opts.quality])))
    try:
        return request_from_payload(payload)
    except InvalidRequestError as exc:  # name the OpenAI parameter the schema's field came from
        param = _PARAM_OF.get(exc.field, exc.field) if exc.field else None
        raise InvalidRequestError(exc.message, field=param, value=exc.value, allowed=exc.allowed) from None


def _with_previews(request: GenerateRequest, partial_images: int) -> GenerateRequest:
    """``request`` asking the engine for cheap previews (``preview="approx"``) when partial images are wanted.

    Where the request schema has no ``preview`` field (an engine without previews), the request is kept and
    the stream carries no partial images.
    """
    if partial_images <= 0 or "preview" not in GenerateRequest.model_fields:
        return request
    data = request.model_dump(exclude_unset=True)
    data["preview"] = "approx"
    return request_from_payload(data)


# -- the answer --------------------------------------------------------------------------------------------


def _usage(prompt: str, result: Generated) -> dict[str, Any]:
    words = len(prompt.split())
    w = int(result.parameters.get("width") or 0)
    h = int(result.parameters.get("height") or 0)
    out = len(result.images) * max(1, math.ceil((w // 8) * (h // 8) / 16))
    return {"input_tokens": words, "output_tokens": out, "total_tokens": words + out,
            "input_tokens_details": {"text_tokens": words, "image_tokens": 0},
            "output_tokens_details": {"image_tokens": out, "text_tokens": 0}}


def _size_of(result: Generated) -> str:
    return f"{result.parameters.get('width')}x{result.parameters.get('height')}"


def _reencode(image: bytes, fmt: str, result: Generated) -> bytes:
    """The image in ``fmt`` (the worker already encoded it so; kept for a custom answer in another format)."""
    if result.format == fmt:
        return image
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(buf, format={"jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def _save_for_url(settings: Settings, image: bytes, fmt: str) -> str:
    """Write one image for ``response_format=url``; drop the expired ones. Returns its file name."""
    root = settings.image_urls_dir
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in root.iterdir():
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > URL_TTL_S:
                old.unlink()
    name = f"{secrets.token_hex(16)}.{fmt}"
    tmp = root / f".{name}.tmp"
    tmp.write_bytes(image)
    os.replace(tmp, root / name)
    return name


async def image_file(request: Request, name: str) -> Response:
    """``GET /v1/images/files/{name}``: an image of a ``url`` answer, until it expires."""
    settings: Settings = request.state.settings
    stem, _, ext = name.partition(".")
    if len(stem) != 32 or not all(c in "0123456789abcdef" for c in stem) or ext not in ("png", "jpeg", "webp"):
        return _error(404, "no such image", "invalid_request_error", None, "not_found")
    path = settings.image_urls_dir / name
    try:
        fresh = time.time() - path.stat().st_mtime <= URL_TTL_S
    except OSError:
        fresh = False
    if not fresh:
        return _error(404, "no such image (image URLs expire after an hour)", "invalid_request_error", None,
                      "not_found")
    return FileResponse(path, media_type=f"image/{ext}")


# -- the route -----------------------------------------------------------------------------------------------


async def generations(request: Request) -> Response:
    """``POST /v1/images/generations``."""
    settings: Settings = request.state.settings
    try:
        raw = await read_body(request, settings.max_body_bytes)
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError):
            raise _bad("We could not parse the JSON body of your request.", "body") from None
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.", "body")
    except SdmakerError as exc:
        return openai_error_response(exc)
    return await _images(request, body, None)


async def edits(request: Request) -> Response:
    """``POST /v1/images/edits``: multipart/form-data, image-to-image or inpainting (module docstring)."""
    settings: Settings = request.state.settings
    try:
        raw = await read_body(request, settings.max_body_bytes)
        form = _form_fields(raw, request.headers.get("content-type") or "")
        body, edit = _edit_fields(form)
    except SdmakerError as exc:
        return openai_error_response(exc)
    return await _images(request, body, edit)


def _form_fields(raw: bytes, content_type: str) -> dict[str, list[tuple[str | None, bytes]]]:
    """A multipart/form-data body: name -> [(filename or None, bytes)], parsed by the standard library."""
    from email import policy
    from email.parser import BytesParser

    if not content_type.lower().startswith("multipart/form-data"):
        raise _bad("Send /v1/images/edits as multipart/form-data (image, mask, prompt, ...).", "body")
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        raise _bad("The multipart/form-data body could not be parsed.", "body")
    fields: dict[str, list[tuple[str | None, bytes]]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise _bad("A form part has no name.", "body")
        payload = part.get_payload(decode=True)
        fields.setdefault(name, []).append((part.get_filename(), payload if isinstance(payload, bytes) else b""))
    return fields


def _edit_fields(form: dict[str, list[tuple[str | None, bytes]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The form as the JSON API's body (typed values) and the schema's image fields (base64, sdmaker's mask)."""
    body: dict[str, Any] = {}
    for name, values in form.items():
        if name in ("image", "image[]", "mask"):
            continue
        if len(values) != 1:
            raise _bad(f"'{name}' is given {len(values)} times", name)
        text = values[0][1].decode("utf-8", "replace")
        if name in _FORM_INTS:
            try:
                body[name] = int(text)
            except ValueError:
                raise _bad(f"Invalid value for '{name}': {text[:40]!r}; expected an integer", name) from None
        elif name in _FORM_FLOATS:
            try:
                body[name] = float(text)
            except ValueError:
                raise _bad(f"Invalid value for '{name}': {text[:40]!r}; expected a number", name) from None
        elif name == "stream":
            body[name] = text.lower() in ("true", "1")
        else:
            body[name] = text
    images = form.get("image", []) + form.get("image[]", [])
    if len(images) != 1:
        raise _bad("Give exactly one 'image' file to edit." if images else "Missing required parameter: 'image'.",
                   "image")
    masks = form.get("mask", [])
    if len(masks) > 1:
        raise _bad("Give at most one 'mask' file.", "mask")
    image = images[0][1]
    mask = _sdmaker_mask(masks[0][1] if masks else None, image)
    edit: dict[str, Any] = {"image": base64.b64encode(image).decode("ascii")}
    if mask is not None:
        edit["mask_image"] = base64.b64encode(mask).decode("ascii")
    strength = body.pop("strength", None)
    if strength is not None:
        edit["strength"] = strength
    body.pop("input_fidelity", None)
    return body, edit


def _sdmaker_mask(mask: bytes | None, image: bytes) -> bytes | None:
    """An OpenAI mask (transparent = edit) as sdmaker's ``mask_image`` PNG (white = repaint).

    A mask without alpha is taken as sdmaker's own already. No mask: the image's transparent pixels, if any.
    """
    from PIL import Image

    source, param = (mask, "mask") if mask is not None else (image, "image")
    try:
        with Image.open(io.BytesIO(source)) as img:
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            alpha = img.convert("RGBA").getchannel("A") if has_alpha else None
    except (OSError, ValueError, Image.DecompressionBombError):
        raise _bad(f"'{param}' is not a PNG, JPEG or WebP image.", param) from None
    if alpha is None:
        return mask
    lowest = alpha.getextrema()[0]
    if mask is None and isinstance(lowest, int) and lowest >= 128:
        return None  # an opaque image and no mask: image-to-image
    repaint = alpha.point(lambda a: 255 if a < 128 else 0)
    buf = io.BytesIO()
    repaint.save(buf, format="PNG")
    return buf.getvalue()


async def _images(request: Request, body: dict[str, Any], edit: dict[str, Any] | None) -> Response:
    """Generate (``edit`` None) or edit images as the OpenAI request ``body`` asks; the answer both routes give."""
    settings: Settings = request.state.settings
    manager: EndpointManager = request.state.manager
    metrics: DaemonMetrics = request.state.metrics
    try:
        opts = _Options(body, settings)
        gen_request = _schema_request(body, opts, {}, edit)  # bad input is refused before any endpoint is started
        rt = await resolve_target(manager, settings, opts.target)
        if QUALITY_STEPS[opts.quality] != 1.0:  # steps relative to the model's own default
            gen_request = _schema_request(body, opts, model_defaults(manager, rt.name), edit)
        gen_request = _with_previews(gen_request, opts.partial_images if opts.stream else 0)
    except SdmakerError as exc:
        return openai_error_response(exc)
    if opts.user:
        logger.info("OpenAI images request for %s from user %s", rt.name, utf8_safe(str(opts.user))[:200])
    job_id = new_job_id()
    prompt = str(body["prompt"])
    if opts.stream:
        return StreamingResponse(_stream(request, manager, metrics, rt, gen_request, opts, prompt, job_id),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Sdmaker-Job-Id": job_id})
    try:
        result = await generate(manager, metrics, rt, gen_request, job_id=job_id)
    except SdmakerError as exc:
        return openai_error_response(exc)
    data = []
    for image in result.images:
        encoded = _reencode(image, opts.output_format, result)
        if opts.response_format == "url":
            name = await asyncio.to_thread(_save_for_url, settings, encoded, opts.output_format)
            data.append({"url": str(request.base_url).rstrip("/") + FILES_PREFIX + name, "revised_prompt": None})
        else:
            data.append({"b64_json": base64.b64encode(encoded).decode("ascii"), "revised_prompt": None})
    answer = {"created": int(time.time()), "data": data, "background": "opaque", "output_format": opts.output_format,
              "quality": _answer_quality(opts.quality), "size": _size_of(result), "usage": _usage(prompt, result)}
    return JSONResponse(answer, headers={"X-Sdmaker-Job-Id": job_id, "X-Sdmaker-Seeds":
                                         ",".join(str(s) for s in result.seeds)})


def _answer_quality(quality: str) -> str:
    return {"auto": "medium", "standard": "medium", "hd": "high"}.get(quality, quality)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(request: Request, manager: EndpointManager, metrics: DaemonMetrics, rt: Any,
                  gen_request: GenerateRequest, opts: _Options, prompt: str, job_id: str) -> AsyncIterator[bytes]:
    """The streamed answer: partial images from the job's previews, then one completed event per image.

    Previews come from the job's event log (:mod:`._events`); where the engine publishes none, the stream
    has no partial images and ends with the completed events all the same.
    """
    manager.events.open(job_id)
    task = asyncio.ensure_future(generate(manager, metrics, rt, gen_request, job_id=job_id))
    common = {"background": "opaque", "output_format": opts.output_format,
              "quality": _answer_quality(opts.quality)}
    sent = 0
    try:
        after = 0
        while opts.partial_images > 0 and not task.done():
            # wakes at least every second, so a job that ends without a terminal event cannot hold the stream
            async for event in manager.events.subscribe(job_id, after, idle_timeout_s=1.0):
                after = event.id
                if event.type != "preview" or sent >= opts.partial_images:
                    continue
                image, step, total = event.data.get("image"), event.data.get("step"), event.data.get("total")
                if not isinstance(image, str) or event.data.get("index", 0) != 0:
                    continue
                # spread the partial images over the run: the k-th once (k+1)/(partial_images+1) of it is done
                if isinstance(step, int) and isinstance(total, int) and total > 0 and sent < opts.partial_images - 1 \
                        and step * (opts.partial_images + 1) < (sent + 1) * total:
                    continue
                size = opts.size if opts.width is None else f"{opts.width}x{opts.height}"
                yield _sse("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": image, "created_at": int(event.time),
                    "size": size, "partial_image_index": sent, **common})
                sent += 1
            if manager.events.finished(job_id):
                break
        try:
            result = await task
        except SdmakerError as exc:
            body = json.loads(bytes(openai_error_response(exc).body))
            yield _sse("error", body)
            return
        usage = _usage(prompt, result)
        for image in result.images:
            encoded = _reencode(image, opts.output_format, result)
            yield _sse("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": base64.b64encode(encoded).decode("ascii"),
                "created_at": int(time.time()), "size": _size_of(result), "usage": usage, **common})
    finally:
        if not task.done():  # the client went away: the invocation finishes on its own, unobserved
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)


def openai_models(settings: Settings, manager: EndpointManager) -> dict[str, Any]:
    """``GET /v1/models``: the endpoints a client may name (plus the alias target)."""
    names = [r.name for r in manager.db.endpoints()]
    if settings.openai_model not in names:
        names.append(settings.openai_model)
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "sdmaker"}
                                       for n in names]}


def add_openai_routes(app: FastAPI, drain: Any) -> None:
    """Register the OpenAI routes on the daemon ``app``; ``drain`` is its shutdown state (:class:`._app.Drain`)."""

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> Response:
        if drain.draining:
            return openai_error_response(drain.error())
        response: Response = await drain.run(generations(request))
        return response

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Response:
        if drain.draining:
            return openai_error_response(drain.error())
        response: Response = await drain.run(edits(request))
        return response

    @app.get(FILES_PREFIX + "{name}")
    async def images_file(request: Request, name: str) -> Response:
        return await image_file(request, name)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return openai_models(request.state.settings, request.state.manager)
