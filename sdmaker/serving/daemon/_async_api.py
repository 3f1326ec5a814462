"""``InvokeEndpointAsync`` on the wire, and sdmaker's job status routes.

* ``POST /endpoints/{EndpointName}/async-invocations`` -- the headers botocore's ``sagemaker-runtime`` model
  sends (``X-Amzn-SageMaker-Content-Type``, ``-Accept``, ``-Custom-Attributes``, ``-Inference-Id``,
  ``-InputLocation``, ``-S3OutputPathExtension``, ``-Filename``, ``-RequestTTLSeconds``,
  ``-InvocationTimeoutSeconds``) and either an ``InputLocation`` or an inline body of at most 128,000
  bytes. Answers 202 with ``{"InferenceId": ...}`` and the ``X-Amzn-SageMaker-OutputLocation`` /
  ``-FailureLocation`` headers (``OutputLocation``/``FailureLocation`` are in the JSON body too). Errors are
  the runtime API's (:func:`~._invoke_api.runtime_error_response`): ``ValidationError`` (400) for bad
  headers, an unknown endpoint or one without ``AsyncInferenceConfig``; ``ServiceUnavailable`` (503 +
  ``Retry-After``) for a full queue or a draining daemon.
* ``GET /sdmaker/v1/jobs`` (``endpoint``, ``state``, ``limit``), ``GET /sdmaker/v1/jobs/{id}`` (404 JSON for
  an unknown id) and ``POST /sdmaker/v1/jobs/{id}/cancel``.

The InferenceId is the job's id. Submitting an InferenceId again answers the job it already names (a
client retrying a submit never runs the request twice).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from sdmaker.config import Settings
from sdmaker.errors import InvalidRequestError, PayloadTooLargeError, SdmakerError
from sdmaker.serving._http import read_body
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._invoke_api import runtime_error_response
from sdmaker.serving.daemon._jobs import (
    DEFAULT_INVOCATION_TIMEOUT_S,
    DEFAULT_TTL_S,
    AsyncJobs,
    JobSubmission,
    async_config_of,
    result_locations,
)
from sdmaker.serving.daemon._metrics import DaemonMetrics
from sdmaker.serving.daemon._state import EndpointStatus

__all__ = ["MAX_INLINE_BODY", "invoke_endpoint_async", "parse_async_headers"]

#: ``AsyncBodyBlob.max`` in botocore's sagemaker-runtime model.
MAX_INLINE_BODY = 128_000
_INPUT_LOCATION = re.compile(r"^(https|s3)://([^/]+)/?(.*)$")
_INFERENCE_ID = re.compile(r"^\S[\x20-\x7e]{0,63}$")
_EXTENSION = re.compile(r"^(?!s3:|https:)[a-zA-Z0-9!_.*'()/-]{1,512}$")
_FILENAME = re.compile(r"^(?!.*\..*\.)[a-zA-Z0-9][a-zA-Z0-9-_.]{0,31}$")
_ASCII_HEADER = re.compile(r"^[\x00-\x7f]{0,1024}$")


def _invalid(member: str, value: str, constraint: str) -> InvalidRequestError:
    shown = value if len(value) <= 80 else value[:77] + "..."
    return InvalidRequestError(f"1 validation error detected: Value '{shown}' at '{member}' failed to satisfy "
                               f"constraint: {constraint}", field=member)


def _integer(headers: dict[str, str], name: str, member: str, low: int, high: int, default: int) -> int:
    raw = headers.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise _invalid(member, raw, "Member must be an integer") from None
    if value < low:
        raise _invalid(member, raw, f"Member must have value greater than or equal to {low}")
    if value > high:
        raise _invalid(member, raw, f"Member must have value less than or equal to {high}")
    return value


def parse_async_headers(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The InvokeEndpointAsync members from the request (lower-cased header names), checked against botocore's
    shapes; raises :class:`InvalidRequestError` (or :class:`PayloadTooLargeError`) naming the member."""
    out: dict[str, Any] = {}
    for name, member in (("x-amzn-sagemaker-content-type", "contentType"), ("x-amzn-sagemaker-accept", "accept"),
                         ("x-amzn-sagemaker-custom-attributes", "customAttributes")):
        value = headers.get(name)
        if value is not None and not _ASCII_HEADER.match(value):
            raise _invalid(member, value, "Member must have length less than or equal to 1024 and be ASCII")
        out[member] = value or None
    inference_id = headers.get("x-amzn-sagemaker-inference-id")
    if inference_id is not None and not _INFERENCE_ID.match(inference_id):
        raise _invalid("inferenceId", inference_id, "Member must have length between 1 and 64 and satisfy regular "
                       r"expression pattern: \A\S[\p{Print}]*\z")
    out["inferenceId"] = inference_id
    location = headers.get("x-amzn-sagemaker-inputlocation")
    if location is not None:
        if not 1 <= len(location) <= 1024 or not _INPUT_LOCATION.match(location):
            raise _invalid("inputLocation", location, "Member must satisfy regular expression pattern: "
                           "^(https|s3)://([^/]+)/?(.*)$")
        if not location.startswith("s3://"):
            raise _invalid("inputLocation", location, "sdmaker reads inputs from s3:// locations only")
    if location is not None and body:
        raise InvalidRequestError("Body and InputLocation are mutually exclusive: provide exactly one of them",
                                  field="Body")
    if location is None and not body:
        raise InvalidRequestError("Provide the request in InputLocation (an s3:// URI) or as an inline Body",
                                  field="InputLocation")
    if len(body) > MAX_INLINE_BODY:
        raise PayloadTooLargeError(f"1 validation error detected: the inline Body has {len(body)} bytes; it must "
                                   f"have length less than or equal to {MAX_INLINE_BODY} (put larger inputs in S3 and "
                                   "pass InputLocation)", field="Body", limit=MAX_INLINE_BODY)
    out["inputLocation"] = location
    extension = headers.get("x-amzn-sagemaker-s3outputpathextension")
    if extension is not None and (not _EXTENSION.match(extension) or ".." in extension.split("/")):
        raise _invalid("s3OutputPathExtension", extension,
                       "Member must satisfy regular expression pattern: ^(?!s3:|https:)[a-zA-Z0-9!_.*'()/-]+$")
    out["s3OutputPathExtension"] = extension
    filename = headers.get("x-amzn-sagemaker-filename")
    if filename is not None and not _FILENAME.match(filename):
        raise _invalid("filename", filename, "Member must have length between 1 and 32 and satisfy regular "
                       r"expression pattern: ^(?!.*\..*\.)[a-zA-Z0-9][a-zA-Z0-9-_\.]*$")
    out["filename"] = filename
    out["requestTTLSeconds"] = _integer(headers, "x-amzn-sagemaker-requestttlseconds", "requestTTLSeconds", 60,
                                        21600, DEFAULT_TTL_S)
    out["invocationTimeoutSeconds"] = _integer(headers, "x-amzn-sagemaker-invocationtimeoutseconds",
                                               "invocationTimeoutSeconds", 1, 3600, DEFAULT_INVOCATION_TIMEOUT_S)
    return out


async def invoke_endpoint_async(request: Request, name: str) -> Response:
    """``InvokeEndpointAsync``: check, queue durably, answer 202 with where the result will be."""
    settings: Settings = request.state.settings
    manager: EndpointManager = request.state.manager
    jobs: AsyncJobs = request.state.jobs
    metrics: DaemonMetrics = request.state.metrics
    request_id = str(uuid.uuid4())
    try:
        body = await read_body(request, settings.max_body_bytes)
        headers = {k.lower(): v for k, v in request.headers.items()}
        members = parse_async_headers(headers, body)
        rec = manager.require(name)
        config = async_config_of(manager, name)
        if config is None:
            raise InvalidRequestError(f"Endpoint {name} is not configured for asynchronous inference: its endpoint "
                                      "configuration has no AsyncInferenceConfig. Use InvokeEndpoint, or create the "
                                      "endpoint with an AsyncInferenceConfig.", field="EndpointName")
        if rec.status is EndpointStatus.FAILED:
            raise InvalidRequestError(f"Endpoint {name} is not in service (status {rec.status}).",
                                      field="EndpointName")
        inference_id = members["inferenceId"]
        job_name = inference_id or str(uuid.uuid4())
        output, failure = result_locations(config, job_name, extension=members["s3OutputPathExtension"],
                                           filename=members["filename"])
        content_type = members["contentType"] or (headers.get("content-type") if body else None)
        sub = JobSubmission(endpoint=name, input_location=members["inputLocation"], body=body or None,
                            content_type=content_type, accept=members["accept"],
                            custom_attributes=members["customAttributes"], ttl_s=members["requestTTLSeconds"],
                            timeout_s=members["invocationTimeoutSeconds"], output_location=output,
                            failure_location=failure)
        job = jobs.submit(sub, job_name)
    except SdmakerError as exc:
        response = runtime_error_response(exc, settings, name, request_id)
        metrics.async_requests.labels(endpoint=name, status=str(response.status_code)).inc()
        return response
    metrics.async_requests.labels(endpoint=name, status="202").inc()
    return JSONResponse({"InferenceId": job.id, "OutputLocation": job.output_location,
                         "FailureLocation": job.failure_location}, status_code=202,
                        headers={"X-Amzn-SageMaker-OutputLocation": job.output_location,
                                 "X-Amzn-SageMaker-FailureLocation": job.failure_location,
                                 "x-amzn-RequestId": request_id})
