"""The ``sagemaker-runtime`` wire API: ``POST /endpoints/{EndpointName}/invocations`` (contract section 4).

Success: the worker's body as is, with ``Content-Type``, ``x-Amzn-Invoked-Production-Variant: AllTraffic``,
``X-Amzn-SageMaker-Custom-Attributes`` and ``x-amzn-RequestId``. Errors: status, ``x-amzn-ErrorType: <Code>``
and a JSON body ``{"message": ...}`` plus the modeled fields; never a ``code`` key, which botocore would
prefer over the header. Status codes are chosen so that botocore retries only what is worth retrying
(it re-sends 500/502/503/504):

=====================================  ===================  ======
situation                              Code                 HTTP
=====================================  ===================  ======
unknown endpoint, bad input            ValidationError      400
endpoint not InService                 ValidationError      400
body over the limit (6 MiB)            ValidationError      413
model code answered non-2xx            ModelError           424
worker died mid-request, twice          ModelError           424
invocation timeout                     ModelError           424
queue full, or the work ahead would     ServiceUnavailable   503 + Retry-After
make it miss its timeout (admission),
or the daemon is shutting down
over the memory budget, or too large   ValidationError      400
for the timeout even when idle
multi-model endpoint: no or a bad      ValidationError      400
TargetModel, none such under the
prefix, TargetModel on another endpoint
multi-model endpoint: the target       ModelNotReady-       429
model still loads after the load wait  Exception
=====================================  ===================  ======

Every answer carries ``X-Sdmaker-Job-Id`` (the caller's own when it sent one): the job whose progress
``GET /sdmaker/v1/jobs/{id}/events`` shows. Each error also carries ``X-Sdmaker-Error-Code`` (the :mod:`sdmaker.errors` class name) so
:mod:`sdmaker.client` can raise the same exception class.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from sdmaker.config import Settings
from sdmaker.errors import (
    EndpointNotFoundError,
    EndpointNotReadyError,
    InvalidRequestError,
    InvocationFailedError,
    InvocationTimeoutError,
    ModelNotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    SdmakerError,
    UnsupportedFormatError,
    utf8_safe,
)
from sdmaker.schema import body_text, parse_json_body, payload_from_csv, request_from_payload
from sdmaker.serving._http import read_body
from sdmaker.serving._protocol import JOB_ID_HEADER, SEEDS_HEADER
from sdmaker.serving.daemon._admission import OPAQUE_WORK, work_of_body
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._metrics import DaemonMetrics
from sdmaker.serving.daemon._multi_model import TARGET_MODEL_HEADER, MultiModelPool
from sdmaker.serving.daemon._progress import job_id_from

__all__ = ["invoke_endpoint", "runtime_error_response", "validate_default_body", "with_fixed_seed"]

logger = logging.getLogger(__name__)

_TIMEOUT_TEXT = ("Your invocation timed out while waiting for a response from container primary. Review the "
                 "latency metrics for each container in Amazon CloudWatch, resolve the issue, and try again.")


#: longest error message the runtime API answers with (characters)
_MAX_MESSAGE = 1024


def validate_default_body(body: bytes, content_type: str | None,
                          resolve: Callable[[Any], object] | None = None) -> bytes:
    """Check a body for sdmaker's default handler before it is queued (a 400 here, never a 424 later).

    The default handler generates images from text, so only the body types that can carry a request
    reach it: ``application/json`` (the seed's ``{"prompt": ..., "height": ...}`` or the Hugging Face
    toolkit's ``{"inputs": prompt, "parameters": {...}}``) and ``text/csv`` with an ``inputs`` column
    (the toolkit's CSV decoder), both UTF-8. Every other Content-Type, or none, is refused here: the worker
    would refuse it too (no decoder, or an image/array/audio where a prompt belongs). Returns the request
    as canonical JSON (the fields the caller set), which the worker takes without validating it again
    (:data:`~sdmaker.serving._protocol.VALIDATED_HEADER`). Endpoints with their own ``inference.py``
    decide for themselves: their bodies are passed through untouched and this is not called.

    ``resolve`` (asynchronous jobs only, see :mod:`._image_refs`) replaces image references in the decoded
    body by the fetched images before it is validated; without it a reference is a 400 naming its field.

    Raises:
        InvalidRequestError: the body, its Content-Type or a field is not a valid request.
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json":
        payload = parse_json_body(body, content_type)  # the default handler's own parsers: daemon and worker agree
    elif kind == "text/csv":
        payload = payload_from_csv(body_text(body, content_type))
    else:
        shown = utf8_safe((content_type or "")[:80]) or "(none)"
        raise UnsupportedFormatError(
            f"Content type {shown} is not supported by this endpoint's default handler: send the request as "
            "application/json ({\"prompt\": ...} or {\"inputs\": ..., \"parameters\": {...}}) or text/csv with an "
            "inputs column", field="ContentType", value=shown, allowed="application/json, text/csv")
    if resolve is not None:
        resolve(payload)
    request = request_from_payload(payload)
    return request.model_dump_json(exclude_unset=True).encode()


def with_fixed_seed(canonical: bytes) -> bytes:
    """``canonical`` (the default handler's validated JSON) with a seed, chosen here when the caller set none.

    A request whose worker dies under it is sent once more (:mod:`._pool`); with the seed fixed before the
    first attempt the retry gives the very image the first attempt would have (generation is deterministic
    by seed), and the answer reports that seed as usual.
    """
    fields = json.loads(canonical)
    if not isinstance(fields, dict) or fields.get("seed") is not None:
        return canonical
    fields["seed"] = secrets.randbelow(2**32)
    return json.dumps(fields, separators=(",", ":")).encode()


def _error_body(exc: SdmakerError, settings: Settings, endpoint: str | None) -> tuple[int, str, dict[str, Any]]:
    """(HTTP status, AWS error code, body) of a runtime-API error."""
    if isinstance(exc, EndpointNotFoundError):
        return 400, "ValidationError", {"message": f"Endpoint {endpoint} of account {settings.account_id} not found."}
    if isinstance(exc, PayloadTooLargeError):
        return 413, "ValidationError", {"message": exc.message}
    if isinstance(exc, (InvalidRequestError, EndpointNotReadyError)):
        return 400, "ValidationError", {"message": exc.message}
    if isinstance(exc, QueueFullError):
        return 503, "ServiceUnavailable", {"message": exc.message}
    if isinstance(exc, ModelNotReadyError):  # botocore raises client.exceptions.ModelNotReadyException
        return 429, "ModelNotReadyException", {"Message": exc.message, "message": exc.message}
    if isinstance(exc, (InvocationTimeoutError, InvocationFailedError)):
        original = 0 if isinstance(exc, InvocationTimeoutError) else int(exc.fields.get("original_status", 500))
        text = _TIMEOUT_TEXT if isinstance(exc, InvocationTimeoutError) else exc.message
        return 424, "ModelError", _model_error(settings, endpoint, original, text, detail=exc.message)
    if exc.http_status == 403:
        return 403, "InvalidSignatureException", {"message": exc.message}
    return 500, "InternalFailure", {"message": "An internal failure occurred."}


def _model_error(settings: Settings, endpoint: str | None, status: int, original: str, *,
                 detail: str | None = None) -> dict[str, Any]:
    kind = "client" if 400 <= status < 500 else "server"
    log_group = f"/aws/sagemaker/Endpoints/{endpoint}"
    message = (f'Received {kind} error ({status}) from primary with message "{original}". See the endpoint log '
               f"(sdmaker endpoint logs {endpoint}) in account {settings.account_id} for more information.")
    if detail and detail != original:
        message += f" ({detail})"
    return {"ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL", "Message": message, "message": message,
            "OriginalStatusCode": status, "OriginalMessage": original,
            "LogStreamArn": f"arn:aws:logs:{settings.region}:{settings.account_id}:log-group:{log_group}"}


def runtime_error_response(exc: SdmakerError, settings: Settings, endpoint: str | None,
                           request_id: str | None = None) -> JSONResponse:
    status, code, body = _error_body(exc, settings, endpoint)
    for key in ("message", "Message"):  # bounded and UTF-8 safe: an error never echoes a whole input
        text = body.get(key)
        if isinstance(text, str):
            body[key] = utf8_safe(text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "...")
    headers = {"x-amzn-ErrorType": code, "x-amzn-RequestId": request_id or str(uuid.uuid4()),
               "X-Sdmaker-Error-Code": exc.code}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(exc.fields.get("retry_after", 1))
    return JSONResponse(body, status_code=status, headers=headers)


def _count_images(content_type: str, headers: dict[str, str]) -> int:
    """Images in a reply, from the default handler's seeds header (one seed per image); never the body."""
    seeds = headers.get(SEEDS_HEADER.lower(), "").strip()
    if seeds:
        return seeds.count(",") + 1
    return 1 if content_type.startswith("image/") else 0


async def invoke_endpoint(request: Request, name: str) -> Response:
    """``InvokeEndpoint``: validate, queue on the endpoint's pool, answer in SageMaker's wire format."""
    settings: Settings = request.state.settings
    manager: EndpointManager = request.state.manager
    metrics: DaemonMetrics = request.state.metrics
    request_id = str(uuid.uuid4())
    job_id: str | None = None
    with metrics.latency.labels(endpoint=name).time():
        try:
            body = await read_body(request, settings.max_body_bytes)
            job_id = job_id_from(request.headers, manager.events)
            rt = manager.live_for_invoke(name)
            headers = dict(request.headers)
            if TARGET_MODEL_HEADER in headers and not isinstance(rt.pool, MultiModelPool):
                raise InvalidRequestError(f"Endpoint {name} is not a multi-model endpoint and does not support "
                                          "target model header.", field="TargetModel")
            canonical = validate_default_body(body, headers.get("content-type")) if rt.default_handler else None
            if canonical is not None:
                headers["content-type"] = "application/json"  # what the canonical body is, whatever came in
                canonical = with_fixed_seed(canonical)  # a retry on another worker draws the same image
            work = work_of_body(canonical) if rt.default_handler else OPAQUE_WORK
            reply = await manager.invoke(rt, canonical if canonical is not None else body, headers,
                                         validated=canonical is not None, work=work, job_id=job_id)
        except SdmakerError as exc:
            response = runtime_error_response(exc, settings, name, request_id)
            if job_id is not None:
                response.headers[JOB_ID_HEADER] = job_id
            metrics.requests.labels(endpoint=name, status=str(response.status_code)).inc()
            metrics.errors.labels(endpoint=name, code=response.headers["x-amzn-ErrorType"]).inc()
            return response
    assert job_id is not None
    if reply.status >= 300:
        # quote the model's answer, not megabytes of it (it may echo the whole request)
        original = reply.body[:1024].decode("utf-8", errors="replace") + ("..." if len(reply.body) > 1024 else "")
        logger.info("endpoint %s: model answered %d", name, reply.status)
        metrics.requests.labels(endpoint=name, status="424").inc()
        metrics.errors.labels(endpoint=name, code="ModelError").inc()
        return JSONResponse(_model_error(settings, name, reply.status, original), status_code=424,
                            headers={"x-amzn-ErrorType": "ModelError", "x-amzn-RequestId": request_id,
                                     "X-Sdmaker-Error-Code": "InvocationFailedError", JOB_ID_HEADER: job_id})
    content_type = reply.headers.get("content-type", "application/json")
    metrics.requests.labels(endpoint=name, status="200").inc()
    images = _count_images(content_type, reply.headers)
    if images:
        metrics.images.labels(endpoint=name).inc(images)
    headers = {"x-Amzn-Invoked-Production-Variant": "AllTraffic", "x-amzn-RequestId": request_id,
               JOB_ID_HEADER: job_id}
    custom = reply.headers.get("x-amzn-sagemaker-custom-attributes")
    if custom:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = custom
    return Response(content=reply.body, status_code=200, media_type=content_type, headers=headers)
