"""Job ids and progress for synchronous invocations, and the Server-Sent Events route that shows them.

Every invocation gets a job id: the caller's own (request header :data:`JOB_ID_HEADER`, checked by
:func:`job_id_from`) or a fresh one, answered in the same header. Its events (``queued``, ``started``,
``step``, ``preview``, then ``done`` or ``error``; see :mod:`._events`) are published while it runs and
stay replayable for a while after (:data:`~._events.RETAIN_S`).

``GET /sdmaker/v1/jobs/{id}/events`` streams them as Server-Sent Events: each event as ``id:``, ``event:``
and ``data:`` (one JSON line) fields; a comment line (``: keep-alive``) every :data:`KEEPALIVE_S` seconds
while nothing happens; the stream ends after ``done``/``error``. A client that reconnects with
``Last-Event-ID: n`` (or ``?after=n``) gets every event after ``n``, the final one included, even when the
job finished meanwhile. An unknown id is a 404 JSON error (``JobNotFoundError``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sdmaker.errors import ERROR_CODE_HEADER, InvalidRequestError
from sdmaker.serving._protocol import JOB_ID_HEADER, SEEDS_HEADER
from sdmaker.serving.daemon._events import TERMINAL_EVENTS, EventHub
from sdmaker.serving.daemon._worker_process import WorkerReply

__all__ = ["JOB_ID_PATTERN", "KEEPALIVE_S", "MAX_RESULT_IN_EVENT", "done_event", "job_events", "job_id_from",
           "progress_line"]

#: What a caller-chosen job id may look like (it appears in URLs and headers).
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
#: Seconds between keep-alive comments on an idle event stream (proxies drop silent connections).
KEEPALIVE_S = 15.0
#: A JSON result up to this size is carried in the ``done`` event itself (larger: fetch it from the answer).
MAX_RESULT_IN_EVENT = 2 * 1024 * 1024
#: Event types that report progress (what response streams send as progress lines).
PROGRESS_TYPES = frozenset({"queued", "started", "step", "preview"})


def job_id_from(headers: Mapping[str, str], events: EventHub) -> str:
    """The caller's job id (:data:`JOB_ID_HEADER`) when valid and unused, else a fresh one.

    Raises:
        InvalidRequestError: the caller's id is malformed or belongs to a job already known.
    """
    chosen = next((v for k, v in headers.items() if k.lower() == JOB_ID_HEADER.lower()), None)
    if chosen is None:
        return uuid.uuid4().hex
    if not JOB_ID_PATTERN.match(chosen):
        raise InvalidRequestError(f"{JOB_ID_HEADER} must be 1-128 characters of letters, digits and ._:- "
                                  "(starting with a letter or digit)", field=JOB_ID_HEADER, value=chosen[:140])
    if chosen in events:
        raise InvalidRequestError(f"job id {chosen!r} is already in use; choose another {JOB_ID_HEADER}",
                                  field=JOB_ID_HEADER, value=chosen)
    return chosen


def done_event(reply: WorkerReply) -> tuple[str, dict[str, Any]]:
    """The terminal event of a worker's reply: ``done`` (2xx) or ``error`` (the model answered an error).

    ``done`` carries ``status``, ``content_type``, ``seeds`` (default handler), ``bytes`` and ``result``: the
    JSON answer itself when it is JSON of at most :data:`MAX_RESULT_IN_EVENT` bytes (else None).
    """
    content_type = reply.headers.get("content-type", "application/json")
    if reply.status >= 300:
        text = reply.body[:1024].decode("utf-8", errors="replace")
        return "error", {"status": reply.status, "code": reply.headers.get(ERROR_CODE_HEADER.lower(), "ModelError"),
                         "message": text}
    seeds_text = reply.headers.get(SEEDS_HEADER.lower(), "")
    seeds = [int(s) for s in seeds_text.split(",") if s.strip().isdigit()]
    result: Any = None
    if (content_type.split(";")[0].strip() == "application/json" and not reply.streamed
            and len(reply.body) <= MAX_RESULT_IN_EVENT):
        try:
            result = json.loads(reply.body)
        except ValueError:
            result = None
    return "done", {"status": reply.status, "content_type": content_type, "seeds": seeds or None,
                    "bytes": len(reply.body), "result": result}


def progress_line(job_id: str, event_id: int, type_: str, data: Mapping[str, Any]) -> bytes:
    """One progress event as a JSON line (response streams): ``{"type", "job_id", "id", ...data}``."""
    return json.dumps({"type": type_, "job_id": job_id, "id": event_id, **data}, separators=(",", ":")).encode() + b"\n"


def _after(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        return max(0, int(raw))
    except ValueError:
        raise InvalidRequestError("Last-Event-ID (or ?after=) must be an event id (an integer)",
                                  field="Last-Event-ID", value=raw[:40]) from None


async def job_events(request: Request, job_id: str, events: EventHub) -> Response:
    """``GET /sdmaker/v1/jobs/{id}/events``: the job's events as Server-Sent Events (see the module docstring)."""
    if job_id not in events:
        return JSONResponse({"error": "JobNotFoundError", "message": f"job {job_id} not found (unknown, or "
                             "finished too long ago)", "job_id": job_id}, status_code=404,
                            headers={ERROR_CODE_HEADER: "JobNotFoundError"})
    after = _after(request)

    async def stream() -> AsyncIterator[str]:
        last = after
        yield "retry: 1000\n\n"
        while True:
            async for event in events.subscribe(job_id, last, idle_timeout_s=KEEPALIVE_S):
                last = event.id
                yield event.sse()
                if event.type in TERMINAL_EVENTS:
                    return
            # nothing for KEEPALIVE_S (or the job's log is gone): keep the connection, or end it
            if events.finished(job_id) or job_id not in events or await request.is_disconnected():
                return
            yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", JOB_ID_HEADER: job_id})
