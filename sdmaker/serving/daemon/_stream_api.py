"""``InvokeEndpointWithResponseStream``: ``POST /endpoints/{name}/invocations-response-stream`` (contract 4.5).

The answer is an AWS event stream (``application/vnd.amazon.eventstream``), the binary framing botocore's
``EventStream`` parser reads: each message is a prelude (total length, headers length, prelude CRC32), headers
(``:message-type``, ``:event-type`` ...; string values), the payload and a CRC32 of everything before it.

What it carries:

* a default-handler endpoint: one ``PayloadPart`` per progress event of the job while it runs, each a JSON
  line ``{"type": "queued"|"started"|"step"|"preview", "job_id": ..., "id": n, ...}`` (the event's data,
  see :mod:`._events`; previews only when the request asks for them with ``preview``), then the result (the
  body ``InvokeEndpoint`` would answer) as the last ``PayloadPart``;
* an endpoint with its own ``code/inference.py``: its answer; a ``predict_fn`` that returns a generator has
  each chunk sent as a ``PayloadPart`` as soon as it is yielded, as SageMaker's streaming containers do.

Errors before the stream starts (unknown endpoint, bad input, admission) are the runtime API's JSON errors
(:func:`~._invoke_api.runtime_error_response`). Once it has started, a failure is an exception event:
``ModelStreamError`` (``ErrorCode`` ``ModelInvocationTimeExceeded`` for a timeout, ``ModelError`` when the
model answered an error) or ``InternalStreamFailure``; boto3 raises it as an ``EventStreamError`` while the
caller iterates. Response headers: ``X-Amzn-SageMaker-Content-Type`` (the requested
``X-Amzn-SageMaker-Accept``, else ``application/json``), ``x-Amzn-Invoked-Production-Variant``,
``x-amzn-RequestId`` and ``X-Sdmaker-Job-Id``.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from sdmaker.config import Settings
from sdmaker.errors import InvocationTimeoutError, SdmakerError
from sdmaker.serving._http import read_body
from sdmaker.serving._protocol import JOB_ID_HEADER
from sdmaker.serving.daemon._admission import OPAQUE_WORK, work_of_body
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._events import TERMINAL_EVENTS
from sdmaker.serving.daemon._invoke_api import runtime_error_response, validate_default_body, with_fixed_seed
from sdmaker.serving.daemon._metrics import DaemonMetrics
from sdmaker.serving.daemon._progress import PROGRESS_TYPES, job_id_from, progress_line

__all__ = ["EVENTSTREAM_MEDIA_TYPE", "encode_event_message", "exception_event", "invoke_endpoint_stream",
           "payload_part"]

logger = logging.getLogger(__name__)

EVENTSTREAM_MEDIA_TYPE = "application/vnd.amazon.eventstream"
#: botocore refuses payloads over 24 MiB; larger results are split into parts of this size.
_MAX_PART = 16 * 1024 * 1024
_STRING = 7  # header value type: UTF-8 string with a 2-byte length


def encode_event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message (prelude + headers + payload + message CRC32)."""
    raw = b"".join(struct.pack(">B", len(k.encode())) + k.encode() + struct.pack(">BH", _STRING, len(v.encode()))
                   + v.encode() for k, v in headers.items())
    total = 12 + len(raw) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + raw + payload
    return message + struct.pack(">I", binascii.crc32(message))


def payload_part(data: bytes) -> bytes:
    """A ``PayloadPart`` event carrying ``data`` (its ``Bytes``)."""
    return encode_event_message({":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                                 ":message-type": "event"}, data)


def exception_event(kind: str, message: str, error_code: str | None = None) -> bytes:
    """A modeled exception event: ``ModelStreamError`` (with ``ErrorCode``) or ``InternalStreamFailure``."""
    body: dict[str, Any] = {"Message": message}
    if error_code is not None:
        body["ErrorCode"] = error_code
    return encode_event_message({":exception-type": kind, ":content-type": "application/json",
                                 ":message-type": "exception"}, json.dumps(body).encode())


def _parts(data: bytes) -> list[bytes]:
    return [payload_part(data[i:i + _MAX_PART]) for i in range(0, len(data), _MAX_PART)] if data else []


async def invoke_endpoint_stream(request: Request, name: str) -> Response:
    """Validate and admit like InvokeEndpoint, then stream progress lines and the answer as event-stream messages."""
    settings: Settings = request.state.settings
    manager: EndpointManager = request.state.manager
    metrics: DaemonMetrics = request.state.metrics
    request_id = str(uuid.uuid4())
    try:
        body = await read_body(request, settings.max_body_bytes)
        job_id = job_id_from(request.headers, manager.events)
        rt = manager.live_for_invoke(name)
        headers = dict(request.headers)
        accept = headers.pop("x-amzn-sagemaker-accept", None) or "application/json"
        headers["accept"] = accept
        canonical = validate_default_body(body, headers.get("content-type")) if rt.default_handler else None
        if canonical is not None:
            headers["content-type"] = "application/json"
            canonical = with_fixed_seed(canonical)
        work = work_of_body(canonical) if rt.default_handler else OPAQUE_WORK
    except SdmakerError as exc:
        response = runtime_error_response(exc, settings, name, request_id)
        metrics.requests.labels(endpoint=name, status=str(response.status_code)).inc()
        return response
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def on_chunk(data: bytes) -> None:
        for part in _parts(data):
            queue.put_nowait(part)

    async def forward_progress() -> None:
        async for event in manager.events.subscribe(job_id):
            if event.type in TERMINAL_EVENTS:
                return
            if event.type in PROGRESS_TYPES:
                queue.put_nowait(payload_part(progress_line(job_id, event.id, event.type, event.data)))

    watcher = asyncio.create_task(forward_progress()) if rt.default_handler else None
    call = asyncio.create_task(manager.invoke(rt, canonical if canonical is not None else body, headers,
                                              validated=canonical is not None, work=work, job_id=job_id,
                                              on_chunk=on_chunk))
    await asyncio.sleep(0)  # admission runs at once: a refusal is answered before the stream starts
    if call.done() and isinstance(call.exception(), SdmakerError):
        if watcher is not None:
            watcher.cancel()
        refused = call.exception()
        assert isinstance(refused, SdmakerError)
        response = runtime_error_response(refused, settings, name, request_id)
        metrics.requests.labels(endpoint=name, status=str(response.status_code)).inc()
        return response

    async def run() -> None:
        try:
            reply = await call
            if watcher is not None:
                await asyncio.wait_for(watcher, 5.0)  # the terminal event is published: it ends promptly
            if reply.status >= 300:
                text = reply.body[:1024].decode("utf-8", errors="replace")
                queue.put_nowait(exception_event("ModelStreamError", f"Received client error ({reply.status}) from "
                                                 f"primary with message \"{text}\"", "ModelError"))
                metrics.requests.labels(endpoint=name, status="424").inc()
                return
            for part in _parts(reply.body):
                queue.put_nowait(part)
            metrics.requests.labels(endpoint=name, status="200").inc()
        except InvocationTimeoutError as exc:
            queue.put_nowait(exception_event("ModelStreamError", exc.message, "ModelInvocationTimeExceeded"))
        except SdmakerError as exc:
            status = exc.http_status
            kind = "ModelStreamError" if status < 500 or status == 424 else "InternalStreamFailure"
            queue.put_nowait(exception_event(kind, exc.message, "StreamBroken" if kind == "ModelStreamError" else None))
        except Exception:  # noqa: BLE001 - the stream has started: say so in-band
            logger.exception("response stream of endpoint %s failed", name)
            queue.put_nowait(exception_event("InternalStreamFailure", "An internal failure occurred."))
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
            queue.put_nowait(None)

    async def stream() -> AsyncIterator[bytes]:
        task = asyncio.create_task(run())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
        finally:
            if not task.done():  # the caller went away: stop waiting for the answer (its slot comes back)
                call.cancel()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    out = {"X-Amzn-SageMaker-Content-Type": accept, "x-Amzn-Invoked-Production-Variant": "AllTraffic",
           "x-amzn-RequestId": request_id, JOB_ID_HEADER: job_id}
    return StreamingResponse(stream(), status_code=200, media_type=EVENTSTREAM_MEDIA_TYPE, headers=out)
