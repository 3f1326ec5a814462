"""The request handler: the Hugging Face inference toolkit's ``HuggingFaceHandlerService`` for diffusion models.

Per request (toolkit ``handle()``, contract §2.4): Content-Type and Accept are read from the headers
(missing or ``*/*`` Accept means JSON), JSON/CSV bodies become ``str``, then ``transform_fn`` runs, by
default ``input_fn -> predict_fn -> output_fn``, each replaceable by ``code/inference.py``. Any
exception becomes HTTP 400 with MMS's body ``{"code": 400, "type": "InternalServerException",
"message": str(e)}``; sdmaker's own errors add ``"error"`` (the sdmaker class name) and their fields so
the daemon can tell bad input from broken model code.

The defaults are sdmaker's, not the toolkit's text-to-image pipeline: without ``model_fn`` the model
is loaded by :func:`sdmaker.engine.load_model` (fp32 on CPU, the model's ``sdmaker.json`` defaults);
without ``predict_fn`` the body may be the seed's JSON, any :class:`~sdmaker.schema.GenerateRequest`,
or the toolkit's ``{"inputs": prompt, "parameters": {...}}``, validated before any generation; the
answer is ``{"generated_images": [base64 ...], "seeds": [...], ...}`` or, for ``Accept: image/png``
(``image/jpeg``, ``image/webp``), the raw bytes of a single image.

Progress: while a request runs, the default model reports each step (and the previews the request asks
for) to the invocation's :class:`ProgressSink`, which the server frames back to the daemon. A ``predict_fn``
(or ``transform_fn``) that returns a generator streams: each chunk goes out through the sink as it is
yielded (``output_fn``, when defined, encodes each chunk), or, with nobody streaming, the chunks are joined.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdmaker.errors import (
    ERROR_CODE_HEADER,
    GenerationCancelledError,
    InvalidRequestError,
    InvocationTimeoutError,
    SdmakerError,
)
from sdmaker.files import MODEL_CARD_FILE
from sdmaker.schema import GenerateRequest, request_from_payload  # request_from_payload: re-exported
from sdmaker.serving._protocol import SEEDS_HEADER, TIMEOUT_STATUS, deadline_seconds
from sdmaker.serving.container._codecs import (
    JSON,
    decode,
    encode,
    encode_json,
    media_type,
    resolve_accept,
    to_text,
    unsupported,
)
from sdmaker.serving.container._user_module import Context, UserHooks, load_user_module

__all__ = ["PREVIEW_JPEG_QUALITY", "RAW_IMAGE_TYPES", "HandlerResponse", "HandlerService", "ProgressSink", "SdModel",
           "chunk_bytes", "error_body", "is_stream", "model_display_name", "request_from_payload", "result_json"]

logger = logging.getLogger(__name__)

#: The ``time.monotonic()`` instant the current invocation must be answered by (from the daemon's
#: :data:`~sdmaker.serving._protocol.DEADLINE_HEADER`), set by :meth:`HandlerService.handle` for its thread.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("sdmaker_deadline", default=None)

#: Where the current invocation's progress goes (set by :meth:`HandlerService.handle` for its thread when the
#: daemon asked for a framed answer); None: nobody is watching, nothing is reported.
_SINK: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar("sdmaker_progress_sink", default=None)

#: Quality of the JPEG previews sent in ``preview`` events (small and quick to encode).
PREVIEW_JPEG_QUALITY = 80


class ProgressSink:
    """Receives one invocation's progress events and streamed body chunks, from the handler's thread.

    ``event(type, data)`` and ``chunk(bytes)`` are the callables the server passes in (they frame and send).
    """

    def __init__(self, event: Callable[[str, dict[str, Any]], None], chunk: Callable[[bytes], None]) -> None:
        self.event = event
        self.chunk = chunk

    def on_progress(self, progress: Any) -> None:
        """A :class:`~sdmaker.engine.StepProgress` as a ``step`` event, then one ``preview`` event per image."""
        self.event("step", progress.to_dict())
        for index, array in enumerate(progress.previews or ()):
            self.event("preview", {"step": progress.step, "total": progress.total, "index": index,
                                   "kind": progress.preview_kind, "format": "jpeg",
                                   "image": _jpeg_base64(array)})


def _jpeg_base64(array: Any) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _progress_callback() -> Callable[[Any], None] | None:
    sink = _SINK.get()
    return sink.on_progress if sink is not None else None


def is_stream(obj: Any) -> bool:
    """Whether a ``predict_fn``/``transform_fn`` returned a stream of chunks (a generator or other iterator)."""
    return isinstance(obj, Iterator) and not isinstance(obj, (str, bytes, bytearray, memoryview, dict, list, tuple))


def chunk_bytes(chunk: Any) -> bytes:
    """One streamed chunk as bytes: bytes as is, str as UTF-8, anything else as one compact JSON line."""
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    try:
        return json.dumps(chunk, separators=(",", ":")).encode("utf-8") + b"\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Unsupported streamed chunk type: {type(chunk).__name__} ({exc}); yield bytes, str or "
                        "JSON-serialisable data from a streaming predict_fn") from None


#: Accept values for which the default handler answers one image's raw bytes.
RAW_IMAGE_TYPES: dict[str, str] = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


@dataclass
class HandlerResponse:
    """What goes back over HTTP for one invocation."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    #: the body went out as chunks through the progress sink already (``body`` is empty)
    streamed: bool = False


#: longest error message a worker answers with (characters)
MAX_ERROR_MESSAGE = 1024


def error_body(status: int, message: str, *, type_: str = "InternalServerException",
               extra: Mapping[str, Any] | None = None) -> bytes:
    """MMS's error JSON (Gson pretty-print: 2-space indent, ``'`` as ``\\u0027``, trailing newline).

    The message is cut at :data:`MAX_ERROR_MESSAGE` characters: model code may put a whole request into
    an exception, and an error answer never echoes megabytes back.
    """
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + f"... ({len(message)} characters)"
    payload: dict[str, Any] = {"code": status, "type": type_, "message": message}
    for key, value in (extra or {}).items():
        payload.setdefault(key, value)
    text = json.dumps(payload, indent=2, default=repr).replace("'", "\\u0027")
    return (text + "\n").encode("utf-8")


def _sdmaker_extra(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SdmakerError):
        data = exc.to_dict()
        data.pop("message", None)
        return data
    return {}


class SdModel:
    """The default model: an engine :class:`~sdmaker.engine.LoadedModel` that also behaves like its pipeline.

    A ``predict_fn`` written for ``StableDiffusionPipeline`` (the seed's) may be combined with the
    default ``model_fn``: calling this object or reading its attributes reaches the pipeline.
    :meth:`run` is the one call site of generation; the step-level batcher replaces ``runner``.
    """

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        #: set when the worker stops (SIGTERM): generations end at their next step boundary
        self.stopping = threading.Event()
        #: ``runner(loaded_model, request) -> GenerationResult``; swap in a batcher's submit here.
        self.runner: Callable[[Any, GenerateRequest], Any] = self._generate

    def _generate(self, loaded: Any, request: GenerateRequest) -> Any:
        """``generate``, stopped at a step boundary once the invocation's deadline passed or the worker stops."""
        from sdmaker.engine import generate

        deadline = _DEADLINE.get()

        def check(_step: int, _total: int) -> None:
            if self.stopping.is_set():
                raise GenerationCancelledError("generation cancelled: the worker is stopping", model=loaded.name)
            if deadline is not None and time.monotonic() >= deadline:
                raise InvocationTimeoutError("generation did not finish before its deadline; it was stopped at a "
                                             "step boundary", model=loaded.name)

        return generate(loaded, request, on_step=check, on_progress=_progress_callback())

    def run(self, request: GenerateRequest) -> Any:
        """Generate ``request``; the single place generation happens for the default handler."""
        return self.runner(self.loaded, request)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.loaded.lock:  # diffusers pipelines keep per-call state
            return self.loaded.pipeline(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "loaded":  # not yet set (copy/pickle): avoid recursion
            raise AttributeError(name)
        return getattr(self.loaded.pipeline, name)


def model_display_name(model_dir: Path) -> str:
    """``sdmaker.json``'s ``name`` when present, else the folder name."""
    card = Path(model_dir) / MODEL_CARD_FILE
    try:
        name = json.loads(card.read_text()).get("name") if card.is_file() else None
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else Path(model_dir).resolve().name


def _looks_like_sd_pipeline(model: Any) -> bool:
    return callable(model) and all(hasattr(model, a) for a in ("unet", "vae", "scheduler", "text_encoder"))


def _is_generation_result(obj: Any) -> bool:
    from sdmaker.engine import GenerationResult

    return isinstance(obj, GenerationResult)


class HandlerService:
    """Loads the model once (``model_fn`` or the default) and answers invocations.

    Args:
        model_dir: the extracted model folder (``/opt/ml/model``'s role).
        program: ``SAGEMAKER_PROGRAM`` (``settings.sagemaker_program``).
        device / dtype: for the *default* model load only; a user ``model_fn`` places its model itself.
        model_name: display name of the model (recipes, JSON answers).
        allow_pickle: let the default loader read ``.bin``/``.ckpt`` weights.
        digest: the model's content digest when already known (store models); computed otherwise.
        validated_by: ``validated_by(headers)`` is True when the spawning daemon already validated this body
            (:func:`sdmaker.serving._protocol.trusts_validation`); the default handler then skips its own
            validation. ``None``: every body is validated here (``sdmaker serve``, direct calls).
    """

    def __init__(self, model_dir: Path, *, program: str | None = None, device: str = "auto", dtype: str = "auto",
                 model_name: str | None = None, allow_pickle: bool = False, server_version: str = "",
                 digest: str | None = None, max_batch: int = 0,
                 validated_by: Callable[[Mapping[str, str]], bool] | None = None) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.validated_by = validated_by
        #: > 0: the default model runs requests through a step-level batcher of this many images
        self.max_batch = max_batch
        self.program = program
        self.device = device
        self.dtype = dtype
        self.model_name = model_name or model_display_name(self.model_dir)
        self.allow_pickle = allow_pickle
        self.digest = digest
        self.hooks = UserHooks()
        self.model: Any = None
        self.context = Context(system_properties={
            "model_dir": str(self.model_dir), "gpu_id": -1, "batch_size": 1,
            "server_name": "sdmaker", "server_version": server_version, "model_name": self.model_name,
        })
        self._adhoc: tuple[Any, Any] | None = None  # (user pipeline, LoadedModel wrapping it)
        self._batcher: Any = None  # the StepBatcher of the default model, when it batches

    # --- startup ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Import the user module, validate its hooks and load the model (``model_fn`` once per worker)."""
        self.context.system_properties["gpu_id"] = self._gpu_id()
        self.hooks = load_user_module(self.model_dir, self.program)
        if self.hooks.model_fn is not None:
            self.model = self.hooks.model_fn(str(self.model_dir), context=self.context)
        else:
            self.model = self.default_model_fn(self.model_dir)
        self._warn_fp16_on_cpu(self.model)

    def _gpu_id(self) -> int:
        if self.device == "cpu":
            return -1
        import torch

        return 0 if torch.cuda.is_available() else -1

    @staticmethod
    def _warn_fp16_on_cpu(model: Any) -> None:
        dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
        if str(dtype) == "torch.float16" and getattr(device, "type", str(device)) == "cpu":
            logger.warning("the model_fn returned a float16 pipeline on the CPU: torch runs it, but about 15x "
                           "slower than float32 (measured on sd1-tiny); sdmaker keeps the dtype your model_fn "
                           "chose. Load with torch_dtype=torch.float32 on CPU-only machines.")

    def default_model_fn(self, model_dir: Path) -> SdModel:
        from sdmaker.engine import load_model

        sd = SdModel(load_model(model_dir, name=self.model_name, device=self.device, dtype=self.dtype,
                                allow_pickle=self.allow_pickle, digest=self.digest))
        if self.max_batch > 0:  # concurrent requests share UNet calls step by step (sdmaker.engine.StepBatcher)
            from sdmaker.engine import StepBatcher

            batcher = StepBatcher(sd.loaded, max_batch=self.max_batch)
            sd.runner = lambda _loaded, request: batcher.submit_async(
                request, deadline=_DEADLINE.get(), on_progress=_progress_callback()).result()
            self._batcher = batcher
        self._enable_compiled_steps(sd.loaded)
        return sd

    @staticmethod
    def _enable_compiled_steps(loaded: Any) -> None:
        """A worker lives long enough to earn a compile back: build compiled steps in the background."""
        from sdmaker.config import load_settings
        from sdmaker.engine import enable_compiled_steps

        settings = load_settings()
        # one size per worker: each compiled size keeps its own frozen copy of the UNet weights
        enable_compiled_steps(loaded, settings.compile, settings.home / "cache" / "compiled", max_sizes=1,
                              cache_bytes=settings.compile_cache_bytes, engine=settings.engine,
                              static_batches=settings.openvino_static)

    def stop(self, reason: str = "the worker is stopping") -> None:
        """End every generation in progress at its next step boundary (SIGTERM: exit promptly, not after it).

        Each stopped request is answered :class:`GenerationCancelledError` (503: retry elsewhere).
        """
        model = self.model
        if isinstance(model, SdModel):
            model.stopping.set()
            if model.loaded.step_compiler is not None:
                model.loaded.step_compiler.close()
        if self._batcher is not None:
            self._batcher.cancel_all(reason)

    def execution_parameters(self) -> dict[str, Any] | None:
        """The container's ``GET /execution-parameters`` answer for batch transform, or ``None`` (404).

        The default request path batches concurrent requests step by step, so a transform job should send
        single records, as many at once as one step batch holds. Model code that replaces a request hook
        says nothing: its container's defaults are AWS's.
        """
        h = self.hooks
        if any(hook is not None for hook in (h.input_fn, h.predict_fn, h.output_fn, h.transform_fn)):
            return None
        return {"MaxConcurrentTransforms": max(1, self.max_batch), "BatchStrategy": "SingleRecord",
                "MaxPayloadInMB": 6}

    # --- the default request hooks -----------------------------------------------------------------

    def default_input_fn(self, input_data: Any, content_type: str | None, context: Context) -> Any:
        return decode(input_data, content_type)

    def default_predict_fn(self, data: Any, model: Any, context: Context) -> Any:
        sd = self._as_sd_model(model)
        if sd is None:  # a non-diffusion model from a user model_fn: the toolkit's generic call
            if not isinstance(data, dict):
                raise InvalidRequestError(f"request body must be a JSON object, got {type(data).__name__}")
            inputs = data.pop("inputs", data)
            parameters = data.pop("parameters", None)
            return model(inputs, **parameters) if parameters is not None else model(inputs)
        # (a body with loras is parsed here anyway: model_construct would leave its entries plain dicts)
        if (self.validated_by is not None and isinstance(data, dict) and not data.get("loras")
                and self.validated_by(context.request_headers)):
            # the daemon parsed this body with request_from_payload and forwarded the canonical fields
            request = GenerateRequest.model_construct(**data)
        else:
            request = request_from_payload(data)
        if self.hooks.output_fn is None:  # we know how the answer will be encoded: refuse early
            accept = resolve_accept(context.get_request_header("Accept"))
            mt = media_type(accept)
            if mt in RAW_IMAGE_TYPES:
                total = len(request.prompts) * (request.num_images_per_prompt or 1)
                if total > 1:
                    raise InvalidRequestError(
                        f"Accept: {accept} returns the raw bytes of one image, but this request asks for {total} "
                        "(prompts x num_images_per_prompt); use Accept: application/json for several", field="num_images_per_prompt",
                        value=total, allowed="1 with an image Accept")
                request = request.model_copy(update={"format": RAW_IMAGE_TYPES[mt]})
            elif mt != JSON:
                raise unsupported(accept, field="Accept")
        result = sd.run(request)
        context.set_response_header(SEEDS_HEADER, ",".join(str(s) for s in result.seeds))
        return result

    def default_output_fn(self, prediction: Any, accept: str, context: Context) -> Any:
        if not _is_generation_result(prediction):
            return encode(prediction, accept)
        mt = media_type(accept)
        if mt in RAW_IMAGE_TYPES:
            if len(prediction.images) != 1:
                raise InvalidRequestError(f"Accept: {accept} returns one image, the prediction holds "
                                          f"{len(prediction.images)}", field="Accept", value=accept)
            if prediction.request.format == RAW_IMAGE_TYPES[mt]:
                return prediction.encode(0)
            from sdmaker.engine import encode_image

            return encode_image(prediction.images[0].image, fmt=RAW_IMAGE_TYPES[mt],
                                quality=prediction.request.quality, recipe=prediction.recipe(0))
        if mt != JSON:
            raise unsupported(accept, field="Accept")
        return encode_json(result_json(prediction))

    def _as_sd_model(self, model: Any) -> SdModel | None:
        if isinstance(model, SdModel):
            return model
        if not _looks_like_sd_pipeline(model):
            return None
        if self._adhoc is None or self._adhoc[0] is not model:
            from sdmaker.engine import LoadedModel, Placement

            placement = Placement(device=str(model.device), dtype=model.dtype)
            loaded = LoadedModel(pipeline=model, path=self.model_dir, name=self.model_name,
                                 digest=self.digest or "", placement=placement)
            self._adhoc = (model, SdModel(loaded))
        return self._adhoc[1]

    def transform(self, model: Any, input_data: Any, content_type: str | None, accept: str, context: Context) -> Any:
        """The default ``transform_fn``: input -> predict -> output, each user-replaceable."""
        h = self.hooks
        t0 = time.perf_counter()
        data = (h.input_fn(input_data, content_type, context=context) if h.input_fn
                else self.default_input_fn(input_data, content_type, context))
        t1 = time.perf_counter()
        prediction = (h.predict_fn(data, model, context=context) if h.predict_fn
                      else self.default_predict_fn(data, model, context))
        t2 = time.perf_counter()
        if is_stream(prediction):  # a streaming predict_fn: output_fn (when given) encodes each chunk
            if h.output_fn is None:
                return prediction
            output_fn = h.output_fn
            return (output_fn(chunk, accept, context=context) for chunk in prediction)
        response = (h.output_fn(prediction, accept, context=context) if h.output_fn
                    else self.default_output_fn(prediction, accept, context))
        logger.info("Preprocess time - %.1f ms, Predict time - %.1f ms, Postprocess time - %.1f ms",
                    (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)
        return response

    # --- one invocation --------------------------------------------------------------------------

    def handle(self, body: bytes, headers: Mapping[str, str], sink: ProgressSink | None = None) -> HandlerResponse:
        """Answer one ``POST /invocations``; never raises (errors become 4xx/5xx responses).

        ``sink``: where progress events (and the chunks of a streaming ``predict_fn``) go while it runs.
        """
        context = self.context.for_request(headers)
        content_type = context.get_request_header("Content-Type")
        accept = resolve_accept(context.get_request_header("Accept"))
        seconds = deadline_seconds(headers)
        token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
        sink_token = _SINK.set(sink)
        try:
            lines = self._json_lines(body, content_type)
            if lines is not None:
                return self._handle_lines(lines, headers, accept)
            return self._handle(body, context, content_type, accept)
        finally:
            _SINK.reset(sink_token)
            _DEADLINE.reset(token)

    def _json_lines(self, body: bytes, content_type: str | None) -> list[bytes] | None:
        """The records of a batch transform ``MultiRecord`` mini-batch (one JSON document per line), or ``None``.

        Only for the default request path (model code with its own hooks gets the body as is), only for a JSON
        body that is not one JSON document, and only when it has several non-empty lines.
        """
        if self.execution_parameters() is None or b"\n" not in body:
            return None
        if media_type(content_type) not in (JSON, "application/jsonlines", "application/x-jsonlines"):
            return None
        lines = [line.strip() for line in body.split(b"\n") if line.strip()]
        if len(lines) < 2:
            return None
        try:
            json.loads(body)
        except ValueError:
            return lines
        return None  # one (pretty-printed) document

    def _handle_lines(self, lines: list[bytes], headers: Mapping[str, str], accept: str) -> HandlerResponse:
        """Answer each line as its own request, concurrently (so they share step batches); the answers are
        joined with newlines in input order. The first failing line fails the mini-batch, named in the error."""
        from concurrent.futures import ThreadPoolExecutor

        def one(line: bytes) -> HandlerResponse:
            return self._handle(line, self.context.for_request(headers), JSON, accept)

        with ThreadPoolExecutor(max_workers=max(1, min(len(lines), self.max_batch or 1)),
                                thread_name_prefix="sdmaker-record") as pool:
            futures = [pool.submit(contextvars.copy_context().run, one, line) for line in lines]
            replies = [f.result() for f in futures]
        for i, reply in enumerate(replies):
            if reply.status >= 300:
                try:
                    payload = json.loads(reply.body)
                    payload["message"] = f"line {i + 1} of {len(lines)} in the request: {payload.get('message')}"
                    body = error_body(reply.status, str(payload.pop("message")), type_=str(payload.pop("type", "InternalServerException")),
                                      extra={k: v for k, v in payload.items() if k != "code"})
                except (ValueError, AttributeError):
                    body = reply.body
                return HandlerResponse(status=reply.status, body=body, content_type=reply.content_type,
                                       headers=reply.headers)
        return HandlerResponse(status=200, body=b"\n".join(r.body for r in replies),
                               content_type=replies[0].content_type)

    def _handle(self, body: bytes, context: Context, content_type: str | None, accept: str) -> HandlerResponse:
        try:
            input_data = to_text(body, content_type)
            if self.hooks.transform_fn is not None:
                response = self.hooks.transform_fn(self.model, input_data, content_type, accept, context=context)
            else:
                response = self.transform(self.model, input_data, content_type, accept, context)
            streamed = False
            if is_stream(response):
                sink = _SINK.get()
                if sink is not None:  # each chunk goes out as it comes
                    for chunk in response:
                        sink.chunk(chunk_bytes(chunk))
                    payload, streamed = b"", True
                else:
                    payload = b"".join(chunk_bytes(chunk) for chunk in response)
            else:
                payload = _to_bytes(response)
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            return self._error(exc, context)
        status = context.response_status or 200
        return HandlerResponse(status=status, body=payload, content_type=accept, headers=context.response_headers,
                               streamed=streamed)

    def _error(self, exc: BaseException, context: Context) -> HandlerResponse:
        # SystemExit / GeneratorExit from model code: keep serving, say what happened.
        message = str(exc) if isinstance(exc, Exception) else f"{type(exc).__name__}({exc}) raised by the model code"
        if isinstance(exc, SdmakerError) and not isinstance(exc, InvalidRequestError):
            logger.error("invocation failed: %s", message)
        elif not isinstance(exc, SdmakerError):
            logger.error("invocation failed in the model code", exc_info=exc)
        else:
            logger.info("invalid request: %s", message)
        if isinstance(exc, (InvocationTimeoutError, GenerationCancelledError)):
            # stopped at a step boundary: the worker is fine; the daemon answers its timeout (or retries)
            status = TIMEOUT_STATUS if isinstance(exc, InvocationTimeoutError) else 503
            headers = {**context.response_headers, ERROR_CODE_HEADER: exc.code}
            return HandlerResponse(status=status, body=error_body(status, message, extra=_sdmaker_extra(exc)),
                                   content_type="application/json", headers=headers)
        return HandlerResponse(status=400, body=error_body(400, message, extra=_sdmaker_extra(exc)),
                               content_type="application/json", headers=context.response_headers)


def _to_bytes(response: Any) -> bytes:
    """MMS's rule for a handler's return value: bytes as is, str as UTF-8, anything else as JSON."""
    if isinstance(response, (bytes, bytearray, memoryview)):
        return bytes(response)
    if isinstance(response, str):
        return response.encode("utf-8")
    try:
        return json.dumps(response, indent=2).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Unsupported model output data type: {type(response).__name__} ({exc}); return bytes, "
                        "str or JSON-serialisable data from output_fn/transform_fn") from None


def result_json(result: Any) -> dict[str, Any]:
    """The default JSON answer: the seed's ``generated_images`` plus what regenerates each image."""
    req = result.request
    answer = {
        "generated_images": [base64.b64encode(result.encode(i)).decode("ascii") for i in range(len(result.images))],
        "seeds": result.seeds,
        "format": req.format,
        "mime_type": result.mime_type,
        "model": result.model_name,
        "model_digest": result.model_digest or None,
        "scheduler": result.scheduler,
        "parameters": {k: getattr(req, k) for k in ("height", "width", "num_inference_steps", "guidance_scale",
                                                      "num_images_per_prompt", "seed")},
        "timings": result.timings,
    }
    if getattr(result, "adapters", None):  # the LoRA adapters applied, with the digests of their files
        answer["adapters"] = result.adapters
    return answer
