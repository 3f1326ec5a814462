"""Per-job progress events in the daemon: one ordered, replayable log per job id.

Every interface that shows progress reads the same log: Server-Sent Events
(``GET /sdmaker/v1/jobs/{id}/events``), ``InvokeEndpointWithResponseStream``, the OpenAI Images API's
``stream``, the web UI and ``GET /sdmaker/v1/jobs/{id}`` (latest step). Progress is per job, never
global, and a client that reconnects with ``Last-Event-ID`` gets every event after that id, the final
``done``/``error`` included, as long as the job is retained (finished jobs are kept for
:data:`RETAIN_S` seconds, at most :data:`MAX_JOBS` of them).

Event types (``data`` is a JSON-able dict):

* ``queued`` -- ``{"position": int}`` (0 = next to run)
* ``started`` -- ``{}``
* ``step`` -- ``{"step": i, "total": n, "elapsed_s": float, "eta_s": float | None}``
* ``preview`` -- ``{"step": i, "total": n, "image": base64 PNG/JPEG, "format": "png"|"jpeg", "index": k}``
* ``done`` -- the result summary (``{"status": int, ...}``); terminal
* ``error`` -- ``{"status": int, "code": str, "message": str}``; terminal

The log lives in memory: durable job state (asynchronous inference) belongs to the job queue's SQLite
table, which answers for a job this log no longer holds. Publishing is thread-safe (worker reader threads
publish too); subscribers are asyncio consumers on the daemon's loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_JOBS", "RETAIN_S", "TERMINAL_EVENTS", "EventHub", "JobEvent"]

#: How long a finished job's events stay replayable.
RETAIN_S = 600.0
#: The most jobs (running or finished) held at once; the oldest finished ones go first.
MAX_JOBS = 2000
#: Event types after which a job publishes nothing more.
TERMINAL_EVENTS = frozenset({"done", "error"})
#: Preview events kept per job (older previews are dropped from the log; steps are always kept).
_MAX_PREVIEWS = 4


@dataclass(frozen=True)
class JobEvent:
    """One event: ``id`` counts from 1 within its job (the SSE ``id:`` line and ``Last-Event-ID``)."""

    id: int
    type: str
    data: dict[str, Any]
    time: float

    def sse(self) -> str:
        """The event as one Server-Sent Events message."""
        import json

        return f"id: {self.id}\nevent: {self.type}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"


@dataclass
class _Log:
    events: list[JobEvent] = field(default_factory=list)
    next_id: int = 1
    finished: float | None = None
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)


class EventHub:
    """The daemon's per-job event logs (one instance, on ``DaemonState``)."""

    def __init__(self, *, retain_s: float = RETAIN_S, max_jobs: int = MAX_JOBS) -> None:
        self._logs: OrderedDict[str, _Log] = OrderedDict()
        self._lock = threading.Lock()
        self._retain_s = retain_s
        self._max_jobs = max_jobs

    def open(self, job_id: str) -> None:
        """Start a log for ``job_id`` (idempotent); publishing opens one too."""
        with self._lock:
            self._get(job_id)

    def __contains__(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._logs

    def publish(self, job_id: str, type_: str, data: dict[str, Any] | None = None) -> JobEvent | None:
        """Append an event and wake the job's subscribers; ``None`` when the job already finished."""
        with self._lock:
            log = self._get(job_id)
            if log.finished is not None:
                return None
            event = JobEvent(log.next_id, type_, dict(data or {}), time.time())
            log.next_id += 1
            log.events.append(event)
            if type_ == "preview":
                previews = [e for e in log.events if e.type == "preview"]
                if len(previews) > _MAX_PREVIEWS:
                    drop = previews[0]
                    log.events = [e for e in log.events if e is not drop]
            if type_ in TERMINAL_EVENTS:
                log.finished = time.monotonic()
            waiters, log.waiters = log.waiters, []
            self._prune()
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)
        return event

    def history(self, job_id: str, after: int = 0) -> list[JobEvent]:
        """Events with ``id > after`` (empty for an unknown job)."""
        with self._lock:
            log = self._logs.get(job_id)
            return [] if log is None else [e for e in log.events if e.id > after]

    def latest(self, job_id: str, type_: str | None = None) -> JobEvent | None:
        """The newest event of the job (of ``type_`` when given)."""
        with self._lock:
            log = self._logs.get(job_id)
            if log is None:
                return None
            for e in reversed(log.events):
                if type_ is None or e.type == type_:
                    return e
            return None

    def finished(self, job_id: str) -> bool:
        with self._lock:
            log = self._logs.get(job_id)
            return log is not None and log.finished is not None

    async def subscribe(self, job_id: str, after: int = 0, *, idle_timeout_s: float | None = None
                        ) -> AsyncIterator[JobEvent]:
        """Yield the job's events after ``after`` as they come, ending after a terminal event.

        ``idle_timeout_s``: stop (without a terminal event) when nothing arrives for that long, so a
        caller can send keep-alives and resume.
        """
        loop = asyncio.get_running_loop()
        while True:
            ev = asyncio.Event()
            with self._lock:
                log = self._get(job_id)
                pending = [e for e in log.events if e.id > after]
                done = log.finished is not None
                if not pending and not done:
                    log.waiters.append((loop, ev))
            for e in pending:
                yield e
                after = e.id
                if e.type in TERMINAL_EVENTS:
                    return
            if done:
                return
            if not pending:
                try:
                    await asyncio.wait_for(ev.wait(), idle_timeout_s)
                except TimeoutError:
                    return

    def _get(self, job_id: str) -> _Log:
        log = self._logs.get(job_id)
        if log is None:
            log = self._logs[job_id] = _Log()
            self._prune()
        return log

    def _prune(self) -> None:
        now = time.monotonic()
        for jid in [j for j, lg in self._logs.items()
                    if lg.finished is not None and now - lg.finished > self._retain_s]:
            del self._logs[jid]
        if len(self._logs) > self._max_jobs:
            for jid in [j for j, lg in self._logs.items() if lg.finished is not None]:
                del self._logs[jid]
                if len(self._logs) <= self._max_jobs:
                    break
