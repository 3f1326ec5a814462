"""``sdmaker.client.Client``: a small httpx client for the sdmaker daemon.

It speaks the daemon's SageMaker-compatible wire APIs (the same ones boto3 uses) plus sdmaker's own
``/sdmaker/v1`` view, and raises :mod:`sdmaker.errors` classes, never raw httpx errors: the daemon tags
every error with ``X-Sdmaker-Error-Code`` and :func:`_raise_for_status` maps that code back (one
boundary). Message texts are for people: they may change, and the client never reads them to decide.

:meth:`Client.generate` takes the request fields of :class:`~sdmaker.schema.GenerateRequest` as keyword
arguments; its signature and docs are generated from the schema, so a new field needs no change here.

Timeouts are finite: a short connect timeout and a long, per-client read timeout for generation
(CPU generation is slow; the daemon's own invocation budget answers first).
"""

from __future__ import annotations

import base64
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sdmaker.config import Settings, load_settings
from sdmaker.errors import (
    ERROR_CODE_HEADER,
    EndpointNotFoundError,
    InvalidRequestError,
    InvocationFailedError,
    InvocationTimeoutError,
    SdmakerError,
    ServingError,
    WorkerStartError,
    error_class_for_code,
)
from sdmaker.files import atomic_write_bytes
from sdmaker.schema import PROGRESS_FIELDS, GenerateRequest, parse_request, request_fields

__all__ = ["Client", "Generation", "InvokeResult"]

_JSON11 = "application/x-amz-json-1.1"
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


@dataclass
class InvokeResult:
    """Raw answer of an invocation."""

    body: bytes
    content_type: str
    request_id: str | None = None
    custom_attributes: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Generation:
    """Images returned by a text-to-image endpoint (decoded from base64 when the answer was JSON)."""

    images: list[bytes]
    mime_type: str
    raw: dict[str, Any] = field(default_factory=dict)

    def pil(self, index: int = 0) -> Any:
        """Image ``index`` as a PIL image (imports Pillow only when called)."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self.images[index]))

    def extension(self, index: int = 0) -> str:
        """File suffix of image ``index`` (``jpg``, ``png``, ``webp``): from its magic bytes, since an endpoint's
        own handler may answer in any format, else from the answer's MIME type; ``bin`` when neither tells."""
        return _EXT.get(_sniff(self.images[index]) or self.mime_type, "bin")

    def save(self, out_dir: Path, *, prefix: str = "image") -> list[Path]:
        """Write every image to ``out_dir`` (created) and return the paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, data in enumerate(self.images):
            path = out_dir / f"{prefix}-{i:02d}.{self.extension(i)}"
            atomic_write_bytes(path, data)
            paths.append(path)
        return paths


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _raise_for_status(response: httpx.Response) -> None:
    """Map a daemon error answer to the matching :mod:`sdmaker.errors` class (the one HTTP boundary)."""
    if response.status_code < 300:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    message = str(body.get("message") or body.get("Message") or body.get("detail") or response.text
                  or response.reason_phrase)
    code = response.headers.get(ERROR_CODE_HEADER)
    if code:
        cls = error_class_for_code(code)
    else:  # not an sdmaker daemon (or a proxy in front of it answered): classify by status only
        cls = InvalidRequestError if 400 <= response.status_code < 500 else ServingError
    fields: dict[str, Any] = {k: v for k, v in body.items() if k not in ("message", "Message", "error")}
    fields["http_status"] = response.status_code
    fields["aws_code"] = response.headers.get("x-amzn-errortype") or body.get("__type")
    error = cls.__new__(cls)  # the classes' own __init__ take different arguments; the fields are on the wire
    SdmakerError.__init__(error, message, **fields)
    for attr in ("field", "value", "allowed"):  # InvalidRequestError's structured attributes
        setattr(error, attr, fields.get(attr))
    raise error


#: Types of the progress lines a response stream carries before the answer.
_PROGRESS_TYPES = (b'{"type":"queued"', b'{"type":"started"', b'{"type":"step"', b'{"type":"preview"')


def _stream_message(headers: dict[str, Any], payload: bytes, result: bytearray,
                    on_progress: Callable[[dict[str, Any]], None] | None) -> None:
    """One event-stream message: a progress line (to ``on_progress``), a piece of the answer, or an error."""
    kind = headers.get(":message-type")
    if kind in ("exception", "error"):
        name = str(headers.get(":exception-type") or headers.get(":error-code") or "InternalStreamFailure")
        try:
            detail = json.loads(payload)
        except ValueError:
            detail = {}
        message = str(detail.get("Message") or headers.get(":error-message") or name)
        if detail.get("ErrorCode") == "ModelInvocationTimeExceeded":
            raise InvocationTimeoutError(message, aws_code=name)
        raise InvocationFailedError(f"{name}: {message}", aws_code=name, original_status=424)
    if headers.get(":event-type") != "PayloadPart":
        return
    if payload.startswith(_PROGRESS_TYPES) and payload.endswith(b"\n") and b'"job_id"' in payload:
        if on_progress is not None:
            on_progress(json.loads(payload))
        return
    result.extend(payload)


class Client:
    """Talk to a running ``sdmaker up`` daemon.

    Example::

        with Client() as client:
            client.create_endpoint("demo", model="mini")
            gen = client.generate("demo", prompt="a red circle", height=64, width=64, num_inference_steps=2)
            gen.save(Path("out"))

    Args:
        url: daemon URL (default: ``SDMAKER_URL`` or ``http://127.0.0.1:<SDMAKER_PORT>``).
        token: bearer token for a daemon that requires authentication (default ``SDMAKER_API_TOKEN``).
        timeout: read timeout in seconds for invocations (connect timeout is 5 s).
        transport: an httpx transport (tests pass ``httpx.ASGITransport(app)``).
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float = 300.0,
                 settings: Settings | None = None, transport: httpx.BaseTransport | None = None) -> None:
        settings = settings or load_settings()
        self.url = (url or settings.client_url).rstrip("/")
        headers = {"User-Agent": "sdmaker-client"}
        token = token or settings.auth_token or settings.local_token  # local_token: SDMAKER_LOCAL_KEY
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=5.0))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport ---------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise InvocationTimeoutError(f"no answer from {self.url}{path} within the client timeout; raise "
                                         "Client(timeout=...)", url=self.url) from exc
        except httpx.TransportError as exc:
            raise ServingError(f"cannot reach the sdmaker daemon at {self.url} ({type(exc).__name__}); start it "
                               "with `sdmaker up`", url=self.url) from exc
        _raise_for_status(response)
        return response

    def sagemaker(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """One SageMaker control-plane call (``CreateModel``, ``DescribeEndpoint``, ...)."""
        response = self._send("POST", "/", content=json.dumps(body),
                              headers={"X-Amz-Target": f"SageMaker.{operation}", "Content-Type": _JSON11})
        return dict(response.json())

    # -- invocation --------------------------------------------------------------------------------

    def invoke(self, endpoint: str, body: bytes | dict[str, Any], *, content_type: str = "application/json",
               accept: str = "application/json", custom_attributes: str | None = None) -> InvokeResult:
        """``InvokeEndpoint``: send ``body`` (a dict is JSON-encoded) and return the raw answer."""
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": content_type, "Accept": accept}
        if custom_attributes:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = custom_attributes
        response = self._send("POST", f"/endpoints/{endpoint}/invocations", content=payload, headers=headers)
        return InvokeResult(body=response.content, content_type=response.headers.get("content-type", ""),
                            request_id=response.headers.get("x-amzn-requestid"),
                            custom_attributes=response.headers.get("x-amzn-sagemaker-custom-attributes"))

    def invoke_stream(self, endpoint: str, body: bytes | dict[str, Any], *, content_type: str = "application/json",
                      accept: str = "application/json",
                      on_progress: Callable[[dict[str, Any]], None] | None = None) -> InvokeResult:
        """``InvokeEndpointWithResponseStream``: the answer, with each progress line given to ``on_progress``.

        The daemon streams the job's progress events (``{"type": "queued"|"started"|"step"|"preview", "job_id",
        ...}``, one JSON line per part) and then the answer; an error event in the stream raises
        :class:`~sdmaker.errors.InvocationFailedError` (a timeout: :class:`~sdmaker.errors.InvocationTimeoutError`).
        """
        from botocore.eventstream import EventStreamBuffer  # botocore's own parser of the framing

        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": content_type, "X-Amzn-SageMaker-Accept": accept}
        path = f"/endpoints/{endpoint}/invocations-response-stream"
        result = bytearray()
        try:
            with self._http.stream("POST", path, content=payload, headers=headers) as response:
                if response.status_code >= 300:
                    response.read()
                    _raise_for_status(response)
                buffer = EventStreamBuffer()
                for data in response.iter_raw():
                    buffer.add_data(data)
                    for message in buffer:
                        _stream_message(message.headers, message.payload, result, on_progress)
                request_id = response.headers.get("x-amzn-requestid")
                content = response.headers.get("x-amzn-sagemaker-content-type", accept)
        except httpx.TimeoutException as exc:
            raise InvocationTimeoutError(f"no answer from {self.url}{path} within the client timeout; raise "
                                         "Client(timeout=...)", url=self.url) from exc
        except httpx.TransportError as exc:
            raise ServingError(f"cannot reach the sdmaker daemon at {self.url} ({type(exc).__name__}); start it "
                               "with `sdmaker up`", url=self.url) from exc
        return InvokeResult(body=bytes(result), content_type=content, request_id=request_id)

    # -- asynchronous inference --------------------------------------------------------------------

    def invoke_async(self, endpoint: str, body: bytes | dict[str, Any] | None = None, *,
                     input_location: str | None = None, content_type: str = "application/json",
                     accept: str | None = None, inference_id: str | None = None, ttl_s: int | None = None,
                     timeout_s: int | None = None, custom_attributes: str | None = None) -> dict[str, Any]:
        """``InvokeEndpointAsync``: queue ``body`` (inline, <= 128,000 bytes) or the object at ``input_location``.

        Returns ``{"InferenceId", "OutputLocation", "FailureLocation"}``; follow the job with :meth:`job` /
        :meth:`wait_job`. A full queue raises :class:`~sdmaker.errors.QueueFullError` (retry later).
        """
        headers = {"X-Amzn-SageMaker-Content-Type": content_type}
        for name, value in (("Accept", accept), ("Inference-Id", inference_id), ("InputLocation", input_location),
                            ("RequestTTLSeconds", ttl_s), ("InvocationTimeoutSeconds", timeout_s),
                            ("Custom-Attributes", custom_attributes)):
            if value is not None:
                headers[f"X-Amzn-SageMaker-{name}"] = str(value)
        payload = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        response = self._send("POST", f"/endpoints/{endpoint}/async-invocations", content=payload, headers=headers)
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        """One asynchronous job: state, queue position, step i of n, timestamps, output/failure location."""
        return dict(self._send("GET", f"/sdmaker/v1/jobs/{job_id}").json())

    def jobs(self, *, endpoint: str | None = None, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Asynchronous jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if endpoint:
            params["endpoint"] = endpoint
        if state:
            params["state"] = state
        return list(self._send("GET", "/sdmaker/v1/jobs", params=params).json()["jobs"])

    def wait_job(self, job_id: str, *, timeout_s: float = 3600.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the job is succeeded, failed, expired or cancelled; its final status.

        Raises:
            InvocationTimeoutError: still queued or running after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info["state"] not in ("queued", "running"):
                return info
            if time.monotonic() > deadline:
                raise InvocationTimeoutError(f"job {job_id} still {info['state']} after {timeout_s:g} s", job_id=job_id)
            time.sleep(poll_s)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (its failure object says so); its status afterwards."""
        return dict(self._send("POST", f"/sdmaker/v1/jobs/{job_id}/cancel").json())

    def generate(self, endpoint: str, prompt: str | list[str] | None = None, *,
                 on_progress: Callable[[dict[str, Any]], None] | None = None, **fields: Any) -> Generation:
        """Text-to-image with the shared request schema (validated here before anything is sent).

        ``fields`` are :class:`~sdmaker.schema.GenerateRequest`'s; a field given as ``None`` is left unset
        (the endpoint's model default applies). An unknown or out-of-range field raises
        :class:`~sdmaker.errors.InvalidRequestError` naming it. With ``on_progress``, the request is streamed
        (:meth:`invoke_stream`) and each progress event (a dict with ``type`` ``step``: ``step``, ``total``,
        ``elapsed_s``, ``eta_s``; ``preview``: ``index``, base64 JPEG ``image``) is passed to it as it comes.
        """
        if prompt is not None:
            fields["prompt"] = prompt
        request: GenerateRequest = parse_request({k: v for k, v in fields.items() if v is not None})
        body = request.model_dump(mode="json", exclude_none=True)
        for name in PROGRESS_FIELDS:  # sent only when asked for: a daemon that predates them refuses them
            if name not in request.model_fields_set:
                body.pop(name, None)
        result = (self.invoke_stream(endpoint, body, on_progress=on_progress) if on_progress is not None
                  else self.invoke(endpoint, body))
        data = result.json()
        images = data.get("generated_images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise ServingError(f"endpoint {endpoint} answered without 'generated_images'", endpoint=endpoint)
        return Generation(images=[base64.b64decode(b) for b in images], mime_type=f"image/{request.format}",
                          raw={k: v for k, v in data.items() if k != "generated_images"})

    # -- endpoints ---------------------------------------------------------------------------------

    def create_endpoint(self, name: str, *, model: str, workers: int = 1, instance_type: str = "ml.m5.xlarge",
                        timeout_s: float | None = None, environment: dict[str, str] | None = None,
                        wait: bool = True, wait_timeout_s: float = 900.0,
                        async_output: str | None = None) -> dict[str, Any]:
        """CreateModel + CreateEndpointConfig + CreateEndpoint named ``name``; waits for InService by default.

        ``async_output``: an ``s3://`` prefix makes it an asynchronous inference endpoint (AsyncInferenceConfig
        with that S3OutputPath; failures under ``<prefix>/failures``)."""
        self._create_model_and_config(name, name, model, workers, instance_type, timeout_s, environment,
                                      async_output)
        self.sagemaker("CreateEndpoint", {"EndpointName": name, "EndpointConfigName": name})
        return self.wait_for_endpoint(name, timeout_s=wait_timeout_s) if wait else self.describe_endpoint(name)

    def _create_model_and_config(self, name: str, config: str, model: str, workers: int, instance_type: str,
                                 timeout_s: float | None, environment: dict[str, str] | None,
                                 async_output: str | None = None) -> None:
        env = dict(environment or {})
        if timeout_s is not None:
            env["SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"] = str(int(timeout_s))
        model_ref = str(Path(model).resolve()) if Path(model).exists() else model
        self.sagemaker("CreateModel", {"ModelName": config, "PrimaryContainer": {
            "Image": "sdmaker/local-worker:latest", "ModelDataUrl": model_ref, "Environment": env},
            "ExecutionRoleArn": "arn:aws:iam::000000000000:role/sdmaker"})
        body: dict[str, Any] = {"EndpointConfigName": config, "ProductionVariants": [{
            "VariantName": "AllTraffic", "ModelName": config, "InitialInstanceCount": workers,
            "InstanceType": instance_type, "InitialVariantWeight": 1.0}]}
        if async_output:
            body["AsyncInferenceConfig"] = {"OutputConfig": {"S3OutputPath": async_output.rstrip("/"),
                                                             "S3FailurePath": async_output.rstrip("/") + "/failures"}}
        self.sagemaker("CreateEndpointConfig", body)

    def update_endpoint(self, name: str, *, model: str, workers: int = 1, instance_type: str = "ml.m5.xlarge",
                        timeout_s: float | None = None, wait: bool = True,
                        wait_timeout_s: float = 900.0) -> dict[str, Any]:
        """Blue/green update to a new model / worker count (a new model + config named ``<name>-<time>``)."""
        config = f"{name}-{int(time.time() * 1000) % 10**10}"
        self._create_model_and_config(name, config, model, workers, instance_type, timeout_s, None)
        self.sagemaker("UpdateEndpoint", {"EndpointName": name, "EndpointConfigName": config})
        return self.wait_for_endpoint(name, timeout_s=wait_timeout_s) if wait else self.describe_endpoint(name)

    def wait_for_endpoint(self, name: str, *, timeout_s: float = 900.0, poll_s: float = 0.25) -> dict[str, Any]:
        """Poll until the endpoint leaves Creating/Updating; raise WorkerStartError when it Failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.describe_endpoint(name)
            if info["status"] not in ("Creating", "Updating"):
                break
            if time.monotonic() > deadline:
                raise InvocationTimeoutError(f"endpoint {name} still {info['status']} after {timeout_s:g} s",
                                             endpoint=name)
            time.sleep(poll_s)
        if info["status"] == "Failed":
            raise WorkerStartError(f"endpoint {name} failed: {info.get('failure_reason')}", endpoint=name)
        return info

    def describe_endpoint(self, name: str) -> dict[str, Any]:
        """Status, workers, model digest, request counts and p50/p95 latency of one endpoint."""
        return dict(self._send("GET", f"/sdmaker/v1/endpoints/{name}").json())

    def list_endpoints(self) -> list[dict[str, Any]]:
        return list(self._send("GET", "/sdmaker/v1/endpoints").json()["endpoints"])

    def delete_endpoint(self, name: str, *, delete_config: bool = True) -> None:
        """DeleteEndpoint, then its endpoint config and model (as ``predictor.delete_endpoint()`` + ``delete_model``)."""
        info = self.describe_endpoint(name)
        self.sagemaker("DeleteEndpoint", {"EndpointName": name})
        if not delete_config:
            return
        config = info.get("config_name") or name
        try:
            desc = self.sagemaker("DescribeEndpointConfig", {"EndpointConfigName": config})
            self.sagemaker("DeleteEndpointConfig", {"EndpointConfigName": config})
            for variant in desc.get("ProductionVariants", []):
                self.sagemaker("DeleteModel", {"ModelName": variant["ModelName"]})
        except EndpointNotFoundError:
            pass

    def logs(self, name: str, *, offset: int = 0) -> tuple[str, int]:
        """Endpoint log text from byte ``offset`` (``-1``: the tail) and the next offset."""
        data = self._send("GET", f"/sdmaker/v1/endpoints/{name}/logs", params={"offset": offset}).json()
        return str(data["text"]), int(data["offset"])

    def metrics(self) -> str:
        return self._send("GET", "/metrics").text


def _document_generate() -> None:
    """Give ``Client.generate`` the schema's fields as its signature and docs (``help()``, IDEs, ``inspect``)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("endpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    lines = ["", "Request fields (from :class:`~sdmaker.schema.GenerateRequest`):", ""]
    for spec in request_fields():
        annotation = GenerateRequest.model_fields[spec.name].annotation
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if spec.name == "prompt" else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(spec.name, kind, annotation=annotation,
                                        default=inspect.Parameter.empty if spec.required else spec.default))
        allowed = f" Allowed: {spec.allowed}." if spec.allowed else ""
        lines.append(f"- ``{spec.name}``: {spec.description}{allowed}")
    function = Client.generate
    function.__signature__ = inspect.Signature(params, return_annotation=Generation)  # type: ignore[attr-defined]
    function.__doc__ = (function.__doc__ or "") + "\n        ".join(lines) + "\n"


_document_generate()
