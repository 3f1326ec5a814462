"""Asynchronous inference (``InvokeEndpointAsync``): a durable job queue in SQLite and the runner that drains it.

Why: a 512x512 image takes about 40 s on a CPU, and a synchronous call, one open connection per image and
a queue that lives only in memory lose work whenever anything restarts. SageMaker's asynchronous
inference queues each request, runs it when there is room and writes the answer to S3; sdmaker does the
same with the same calls, so the SageMaker SDK's ``AsyncPredictor`` works unchanged.

Life of a job (:class:`JobState`)::

    queued --> running --> succeeded | failed
       |          |
       |          +--> queued     (the daemon or the worker died; admission said "later" with a 503)
       +--> expired               (older than RequestTTLSeconds before it could start)
       +--> cancelled             (POST /sdmaker/v1/jobs/{id}/cancel, queued or running)

Guarantees:

* **Durable**: a job is in ``<home>/endpoints/jobs.sqlite3`` (WAL) before its submit is answered; a daemon
  killed with ``-9`` finds its ``running`` jobs at the next start and queues them again.
* **At-least-once execution, exactly-once outputs**: each job has one output key and one failure key,
  fixed at submit. A result is written with one ``PutObject`` of the complete body (S3 shows an object
  whole or not at all), and a job is marked ``succeeded`` only after that call returned. A job that runs
  again (after a crash) first looks for its output and failure objects (``HeadObject``) and, when one is
  there, takes that as its outcome instead of running again: no object is written twice, and a job never
  has both.
* **Shared serving path**: jobs go through :meth:`~._endpoints.EndpointManager.invoke`, like synchronous
  requests, so they share the workers' step batching and admission; a 503 from admission (or a full pool)
  means "try later": the job goes back to the queue without losing its place.
* **Limits**: ``MaxConcurrentInvocationsPerInstance`` x instances jobs of an endpoint run at once (default:
  the workers' slots), ``RequestTTLSeconds`` bounds the time in the queue, ``InvocationTimeoutSeconds`` the
  time running, ``SDMAKER_ASYNC_MAX_QUEUE`` the queued jobs per endpoint (a submit past it gets 503 with
  ``Retry-After``), and a job whose runs keep dying is failed after :data:`MAX_ATTEMPTS`.

Progress goes to the daemon's :class:`~._events.EventHub` under the job's InferenceId: ``queued``
(with its position), ``started``, the worker's ``step`` events, then ``done`` or ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import (
    EndpointNotReadyError,
    InvalidRequestError,
    InvocationFailedError,
    InvocationTimeoutError,
    JobNotFoundError,
    QueueFullError,
    S3Error,
    SdmakerError,
)
from sdmaker.serving.daemon._admission import OPAQUE_WORK, work_of_body
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._image_refs import S3_TRANSIENT, ImageFetcher, resolve_payload
from sdmaker.serving.daemon._invoke_api import validate_default_body, with_fixed_seed
from sdmaker.serving.daemon._sqlite import SqliteFile
from sdmaker.serving.daemon._state import EndpointStatus

__all__ = [
    "DEFAULT_INVOCATION_TIMEOUT_S",
    "DEFAULT_TTL_S",
    "MAX_ATTEMPTS",
    "AsyncJobs",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobSubmission",
    "async_config_of",
    "result_locations",
]

logger = logging.getLogger(__name__)

#: SageMaker's defaults for ``RequestTTLSeconds`` (6 hours) and ``InvocationTimeoutSeconds`` (15 minutes).
DEFAULT_TTL_S = 21600
DEFAULT_INVOCATION_TIMEOUT_S = 900
#: Runs a job may start before it is failed: a job whose every run kills its worker or the daemon stops here.
MAX_ATTEMPTS = 5
#: Finished jobs older than this are dropped from the table at start (their S3 objects stay).
RETAIN_FINISHED_S = 7 * 24 * 3600.0
#: How often the runner looks at the queue when nothing woke it (endpoints coming up, TTLs, backoffs).
_TICK_S = 0.5
#: After SIGTERM, how long running jobs may take to finish before they are queued again for the next start.
_CLOSE_GRACE_S = 8.0
#: Retry-After of a submit refused because the endpoint's async queue is full.
_FULL_RETRY_AFTER_S = 5
#: After an S3 error worth another try (:data:`~._image_refs.S3_TRANSIENT`), the job waits this long.
_S3_RETRY_S = 5.0
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JobState(str, enum.Enum):
    """A job's state (stored as its value)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return str(self.value)

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class JobSubmission:
    """What an ``InvokeEndpointAsync`` call asks for, checked by the runtime API."""

    endpoint: str
    input_location: str | None
    body: bytes | None
    content_type: str | None
    accept: str | None
    custom_attributes: str | None
    ttl_s: int
    timeout_s: int
    output_location: str
    failure_location: str


@dataclass(frozen=True)
class JobRecord:
    """One stored job (times are epoch seconds)."""

    id: str
    seq: int
    endpoint: str
    state: JobState
    input_location: str | None
    body: bytes | None
    content_type: str | None
    accept: str | None
    custom_attributes: str | None
    output_location: str
    failure_location: str
    ttl_s: int
    timeout_s: int
    created: float
    started: float | None
    finished: float | None
    attempts: int
    failure_reason: str | None

    def public(self) -> dict[str, Any]:
        """The job as ``GET /sdmaker/v1/jobs/{id}`` shows it (without the inline body)."""
        return {"id": self.id, "endpoint": self.endpoint, "state": self.state.value,
                "input_location": self.input_location, "inline_input_bytes": len(self.body) if self.body else None,
                "output_location": self.output_location, "failure_location": self.failure_location,
                "failure_reason": self.failure_reason, "created": self.created, "started": self.started,
                "finished": self.finished, "attempts": self.attempts, "ttl_s": self.ttl_s,
                "timeout_s": self.timeout_s, "content_type": self.content_type, "accept": self.accept}


_COLUMNS = ("id, seq, endpoint, state, input_location, body, content_type, accept, custom_attributes, "
            "output_location, failure_location, ttl_s, timeout_s, created, started, finished, attempts, "
            "failure_reason")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS async_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, endpoint TEXT NOT NULL, state TEXT NOT NULL,
    input_location TEXT, body BLOB, content_type TEXT, accept TEXT, custom_attributes TEXT,
    output_location TEXT NOT NULL, failure_location TEXT NOT NULL, ttl_s INTEGER NOT NULL,
    timeout_s INTEGER NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0, failure_reason TEXT);
CREATE INDEX IF NOT EXISTS async_jobs_queue ON async_jobs (state, endpoint, seq);
"""


def _record(row: tuple[Any, ...]) -> JobRecord:
    (id_, seq, endpoint, state, input_location, body, content_type, accept, custom, output, failure, ttl, timeout,
     created, started, finished, attempts, reason) = row
    return JobRecord(id_, seq, endpoint, JobState(state), input_location, body, content_type, accept, custom, output,
                     failure, ttl, timeout, created, started, finished, attempts, reason)


class JobStore(SqliteFile):
    """The job table, in its own SQLite file beside the daemon's state (one connection, serialised by a lock).

    Every method is one short transaction, called on the event loop (well under a millisecond with WAL):
    ``synchronous=NORMAL`` keeps WAL commits durable across a process kill, which is what the queue must
    survive (a power cut may lose the last commits, as it may lose the S3 server's too).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, synchronous_normal=True)

    def insert(self, job_id: str, sub: JobSubmission) -> bool:
        """Store a new queued job; False when the id is taken."""
        try:
            self._run(f"INSERT INTO async_jobs ({_COLUMNS.replace('seq, ', '')}) VALUES "  # noqa: S608 - fixed
                      "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, 0, NULL)",
                      (job_id, sub.endpoint, JobState.QUEUED.value, sub.input_location, sub.body, sub.content_type,
                       sub.accept, sub.custom_attributes, sub.output_location, sub.failure_location, sub.ttl_s,
                       sub.timeout_s, time.time()))
        except sqlite3.IntegrityError:
            return False
        return True

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._run(f"SELECT {_COLUMNS} FROM async_jobs WHERE id = ?", (job_id,))  # noqa: S608
        return _record(rows[0]) if rows else None

    def listing(self, *, endpoint: str | None = None, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        where, args = [], []
        if endpoint:
            where.append("endpoint = ?")
            args.append(endpoint)
        if state:
            where.append("state = ?")
            args.append(state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._run(f"SELECT {_COLUMNS} FROM async_jobs {clause} ORDER BY seq DESC LIMIT ?",  # noqa: S608
                         (*args, limit))
        return [_record(r) for r in rows]

    def queued_endpoints(self) -> list[str]:
        return [r[0] for r in self._run("SELECT DISTINCT endpoint FROM async_jobs WHERE state = 'queued'")]

    def oldest_queued(self, endpoint: str, limit: int) -> list[JobRecord]:
        rows = self._run(f"SELECT {_COLUMNS} FROM async_jobs WHERE state = 'queued' AND endpoint = ? "  # noqa: S608
                         "ORDER BY seq LIMIT ?", (endpoint, limit))
        return [_record(r) for r in rows]

    def expired(self, now: float) -> list[JobRecord]:
        """Queued jobs older than their TTL."""
        rows = self._run(f"SELECT {_COLUMNS} FROM async_jobs WHERE state = 'queued' AND created + ttl_s < ? "  # noqa: S608
                         "ORDER BY seq", (now,))
        return [_record(r) for r in rows]

    def start(self, job_id: str) -> bool:
        """queued -> running (one more attempt); False when the job is no longer queued."""
        return self._change("UPDATE async_jobs SET state = 'running', started = ?, attempts = attempts + 1 "
                            "WHERE id = ? AND state = 'queued'", (time.time(), job_id)) > 0

    def requeue(self, job_id: str, *, count_attempt: bool = True) -> bool:
        """running -> queued (``count_attempt=False``: the run never reached a worker, it does not count)."""
        less = 0 if count_attempt else 1
        return self._change("UPDATE async_jobs SET state = 'queued', attempts = MAX(0, attempts - ?) "
                            "WHERE id = ? AND state = 'running'", (less, job_id)) > 0

    def finish(self, job_id: str, state: JobState, reason: str | None = None) -> bool:
        """queued/running -> a terminal state; False when the job had finished already (the first outcome wins)."""
        assert state.terminal
        return self._change("UPDATE async_jobs SET state = ?, finished = ?, failure_reason = ? "
                            "WHERE id = ? AND state IN ('queued', 'running')",
                            (state.value, time.time(), reason, job_id)) > 0

    def requeue_running(self) -> int:
        """At start: jobs a killed daemon left running go back to the queue."""
        return self._change("UPDATE async_jobs SET state = 'queued' WHERE state = 'running'")

    def prune(self, before: float) -> int:
        return self._change("DELETE FROM async_jobs WHERE state NOT IN ('queued', 'running') AND finished < ?",
                            (before,))

    def position(self, job: JobRecord) -> int:
        """Queued jobs of the same endpoint ahead of ``job`` (0 = next to run)."""
        return int(self._run("SELECT COUNT(*) FROM async_jobs WHERE state = 'queued' AND endpoint = ? AND seq < ?",
                             (job.endpoint, job.seq))[0][0])

    def count_queued(self, endpoint: str) -> int:
        return int(self._run("SELECT COUNT(*) FROM async_jobs WHERE state = 'queued' AND endpoint = ?",
                             (endpoint,))[0][0])

    def backlog(self) -> dict[str, tuple[int, float | None]]:
        """Per endpoint: (jobs queued or running, creation time of the oldest queued one)."""
        out: dict[str, tuple[int, float | None]] = {}
        for endpoint, state, count, oldest in self._run(
                "SELECT endpoint, state, COUNT(*), MIN(created) FROM async_jobs WHERE state IN ('queued', 'running') "
                "GROUP BY endpoint, state"):
            size, first = out.get(endpoint, (0, None))
            out[endpoint] = (size + int(count), oldest if state == "queued" else first)
        return out


def async_config_of(manager: EndpointManager, endpoint: str) -> dict[str, Any] | None:
    """The ``AsyncInferenceConfig`` of the endpoint's current endpoint config (``None``: a real-time endpoint)."""
    rec = manager.db.endpoint(endpoint)
    config = manager.db.get("endpoint_configs", rec.config_name) if rec is not None else None
    value = config.body.get("AsyncInferenceConfig") if config is not None else None
    return value if isinstance(value, dict) else None


def _join(prefix: str, *parts: str) -> str:
    out = prefix.rstrip("/")
    for part in parts:
        if part:
            out += "/" + part.strip("/")
    return out


def result_locations(config: dict[str, Any], job_id: str, *, extension: str | None = None,
                     filename: str | None = None) -> tuple[str, str]:
    """(output, failure) S3 URIs of a job, as SageMaker names them: ``<S3OutputPath>[/<extension>]/<name>.out``
    and ``<S3FailurePath or S3OutputPath>[/<extension>]/<name>-error.out``.

    ``name`` is the InferenceId when it is a plain file name, else a UUID derived from it (an id may hold
    spaces or slashes); ``filename`` (``X-Amzn-SageMaker-Filename``) names the output object instead.
    """
    output = config.get("OutputConfig") or {}
    stem = job_id if _SAFE_ID.match(job_id) else str(uuid.uuid5(uuid.NAMESPACE_URL, job_id))
    out_path = str(output.get("S3OutputPath") or "")
    fail_path = str(output.get("S3FailurePath") or out_path)
    out_name = filename or f"{stem}.out"
    fail_name = f"{filename.rsplit('.', 1)[0] if filename else stem}-error.out"
    return _join(out_path, extension or "", out_name), _join(fail_path, extension or "", fail_name)


def _failure_body(job: JobRecord, code: str, message: str, status: int | None = None) -> bytes:
    """The failure object: JSON, which the SageMaker SDK's AsyncPredictor decodes into AsyncInferenceModelError."""
    body: dict[str, Any] = {"InferenceId": job.id, "ErrorCode": code, "Message": message}
    if status is not None:
        body["OriginalStatusCode"] = status
    return json.dumps(body).encode()


class _Outcome(Exception):
    """A run ended in a terminal state (raised inside :meth:`AsyncJobs._execute`)."""

    def __init__(self, state: JobState, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.state, self.code, self.message, self.status = state, code, message, status


class _TryLater(Exception):
    """The endpoint cannot take the job now (not serving, admission 503): back to the queue."""

    def __init__(self, after_s: float, *, count_attempt: bool = False) -> None:
        super().__init__(after_s)
        self.after_s, self.count_attempt = after_s, count_attempt


class AsyncJobs:
    """The daemon's asynchronous inference: submit, status, cancel, and the runner (one per daemon)."""

    def __init__(self, settings: Settings, manager: EndpointManager, *,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self.manager = manager
        self.store = JobStore(settings.endpoints_dir / "jobs.sqlite3")
        self._draining = draining
        self._s3: Any = None
        self._s3_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, set[str]] = {}
        self._phase: dict[str, str] = {}
        self._cancel_requested: set[str] = set()
        self._not_before: dict[str, float] = {}  # endpoint -> monotonic time before which nothing starts there
        self._finishing: set[str] = set()  # jobs whose terminal write is under way outside a run (expiry, cancel)
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Queue again what a killed daemon left running, drop old finished jobs, start the runner."""
        again = self.store.requeue_running()
        if again:
            logger.info("asynchronous inference: %d job(s) left running by the previous daemon are queued again",
                        again)
        self.store.prune(time.time() - RETAIN_FINISHED_S)
        self._loop_task = asyncio.create_task(self._run_loop(), name="async-jobs")

    async def close(self, grace_s: float = _CLOSE_GRACE_S) -> None:
        """Stop starting jobs; running ones get ``grace_s`` to finish, the rest are queued again for the next start."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = list(self._tasks.values())
        if tasks:
            logger.info("asynchronous inference: waiting up to %g s for %d running job(s)", grace_s, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.store.close()

    def wake(self) -> None:
        self._wake.set()

    # -- submit and read ---------------------------------------------------------------------------

    def submit(self, sub: JobSubmission, inference_id: str | None) -> JobRecord:
        """Queue a job (durable before this returns); an InferenceId that names a job already answers that job.

        Raises:
            InvalidRequestError: the InferenceId names a job of another endpoint.
            QueueFullError: the endpoint holds ``SDMAKER_ASYNC_MAX_QUEUE`` queued jobs (503, Retry-After).
        """
        job_id = inference_id or str(uuid.uuid4())
        if inference_id is not None:
            existing = self.store.get(job_id)
            if existing is not None:
                return self._same_job(existing, sub)
        queued = self.store.count_queued(sub.endpoint)
        if queued >= self.settings.async_max_queue:
            raise QueueFullError(f"Endpoint {sub.endpoint} has {queued} queued asynchronous request(s), the limit "
                                 f"is {self.settings.async_max_queue} (SDMAKER_ASYNC_MAX_QUEUE); retry later",
                                 endpoint=sub.endpoint, retry_after=_FULL_RETRY_AFTER_S)
        if not self.store.insert(job_id, sub):
            existing = self.store.get(job_id)
            assert existing is not None
            return self._same_job(existing, sub)
        job = self.store.get(job_id)
        assert job is not None
        self.manager.events.publish(job_id, "queued", {"position": self.store.position(job)})
        self._wake.set()
        return job

    @staticmethod
    def _same_job(existing: JobRecord, sub: JobSubmission) -> JobRecord:
        """A submit repeating an InferenceId (a client's retry) answers the job it names: it never runs twice."""
        if existing.endpoint != sub.endpoint:
            raise InvalidRequestError(f"InferenceId {existing.id!r} names a job of endpoint {existing.endpoint}; "
                                      "use a new InferenceId", field="InferenceId")
        return existing

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's status with its progress: queue position, step i of n (from the event log), timestamps."""
        rec = self.store.get(job_id)
        if rec is None:
            raise JobNotFoundError(f"no asynchronous inference job {job_id!r}", job_id=job_id)
        return self._describe(rec)

    def jobs(self, *, endpoint: str | None = None, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if state is not None and state not in {s.value for s in JobState}:
            raise InvalidRequestError(f"state {state!r} is not a job state", field="state", value=state,
                                      allowed=", ".join(s.value for s in JobState))
        return [self._describe(r) for r in self.store.listing(endpoint=endpoint, state=state,
                                                           limit=max(1, min(limit, 1000)))]

    def _describe(self, rec: JobRecord) -> dict[str, Any]:
        out = rec.public()
        out["queue_position"] = self.store.position(rec) if rec.state is JobState.QUEUED else None
        step = self.manager.events.latest(rec.id, "step") if rec.state is JobState.RUNNING else None
        out["step"] = step.data.get("step") if step is not None else None
        out["total_steps"] = step.data.get("total") if step is not None else None
        return out

    def backlog(self) -> dict[str, tuple[int, float]]:
        """Per endpoint: (ApproximateBacklogSize, ApproximateAgeOfOldestRequest in seconds)."""
        now = time.time()
        return {name: (size, max(0.0, now - oldest) if oldest is not None else 0.0)
                for name, (size, oldest) in self.store.backlog().items()}

    def backlog_of(self, endpoint: str) -> dict[str, Any]:
        size, age = self.backlog().get(endpoint, (0, 0.0))
        return {"ApproximateBacklogSize": size, "ApproximateAgeOfOldestRequest": round(age, 3)}

    # -- cancel ------------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job: its failure object says so and it ends ``cancelled``.

        A job that is already writing its result, or finished, is left as it is (the answer shows its state).
        """
        rec = self.store.get(job_id)
        if rec is None:
            raise JobNotFoundError(f"no asynchronous inference job {job_id!r}", job_id=job_id)
        if rec.state is JobState.QUEUED and job_id not in self._finishing and job_id not in self._tasks:
            self._finishing.add(job_id)
            try:
                await self._conclude(rec, _Outcome(JobState.CANCELLED, "Cancelled", "cancelled by request"))
            finally:
                self._finishing.discard(job_id)
        elif job_id in self._tasks and self._phase.get(job_id) != "finish":
            task = self._tasks[job_id]
            self._cancel_requested.add(job_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(task)
        return self.job(job_id)

    # -- the runner --------------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        while not self._closed:
            try:
                await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the runner must outlive any one bad job or endpoint
                logger.exception("asynchronous inference runner")
            self._wake.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK_S)

    async def _dispatch(self) -> None:
        if self._draining() or self._closed:
            return
        for rec in self.store.expired(time.time()):
            if rec.id not in self._finishing:
                self._background(rec, _Outcome(JobState.EXPIRED, "RequestExpired",
                                               f"the request waited longer than its RequestTTLSeconds ({rec.ttl_s} s) "
                                               "in the queue"))
        now = time.monotonic()
        for name in self.store.queued_endpoints():
            if self._not_before.get(name, 0.0) > now:
                continue
            endpoint = self.manager.db.endpoint(name)
            if endpoint is None or endpoint.status is EndpointStatus.FAILED:
                why = (f"endpoint {name} does not exist (deleted after the request was queued)" if endpoint is None
                       else f"endpoint {name} failed: {endpoint.failure_reason or 'see its log'}")
                for job in self.store.oldest_queued(name, 1000):
                    if job.id not in self._finishing:
                        self._background(job, _Outcome(JobState.FAILED, "EndpointUnavailable", why))
                continue
            rt = self.manager.live.get(name)
            if rt is None or rt.pool is None or not rt.status.serving:
                continue  # still Creating (e.g. after a restart): the jobs wait
            running = self._running.setdefault(name, set())
            free = self._limit(name, rt.capacity) - len(running)
            if free <= 0:
                continue
            for job in self.store.oldest_queued(name, free + len(self._finishing)):
                if free <= 0:
                    break
                if job.id in self._finishing or job.id in self._tasks:
                    continue
                if job.attempts >= MAX_ATTEMPTS:
                    self._background(job, _Outcome(
                        JobState.FAILED, "TooManyAttempts",
                        f"the request was started {job.attempts} times and its worker or the daemon died each time"))
                    continue
                if not self.store.start(job.id):
                    continue
                free -= 1
                running.add(job.id)
                self._phase[job.id] = "prepare"
                self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"async-job-{job.id}")

    def _limit(self, name: str, capacity: int) -> int:
        """Jobs of ``name`` that may run at once: MaxConcurrentInvocationsPerInstance x instances, else the
        workers' slots (every worker busy, batch slots included, and no more)."""
        config = async_config_of(self.manager, name) or {}
        per = (config.get("ClientConfig") or {}).get("MaxConcurrentInvocationsPerInstance")
        if isinstance(per, int) and per > 0:
            rec = self.manager.db.endpoint(name)
            cfg = self.manager.db.get("endpoint_configs", rec.config_name) if rec is not None else None
            variants = cfg.body.get("ProductionVariants") if cfg is not None else None
            instances = int((variants or [{}])[0].get("InitialInstanceCount") or 1)
            return per * max(1, instances)
        return max(1, capacity)

    def _background(self, job: JobRecord, outcome: _Outcome) -> None:
        """End a queued job outside a run (expired, endpoint gone, too many attempts)."""
        self._finishing.add(job.id)

        async def conclude() -> None:
            try:
                await self._conclude(job, outcome)
            except Exception:  # noqa: BLE001 - logged; the job stays queued and is looked at again
                logger.exception("asynchronous inference job %s: could not record its end", job.id)
            finally:
                self._finishing.discard(job.id)

        task = asyncio.create_task(conclude(), name=f"async-job-end-{job.id}")
        self._tasks.setdefault(f"end:{job.id}", task)
        task.add_done_callback(lambda _t: self._tasks.pop(f"end:{job.id}", None))

    async def _run(self, job: JobRecord) -> None:
        """One attempt of a job; its end (terminal, or back to the queue) is always recorded."""
        events = self.manager.events
        events.publish(job.id, "started", {"attempt": job.attempts + 1})
        try:
            try:
                await self._execute(job)
            except _Outcome as outcome:
                self._phase[job.id] = "finish"
                await self._conclude(job, outcome)
            except _TryLater as later:
                self.store.requeue(job.id, count_attempt=later.count_attempt)
                self._not_before[job.endpoint] = time.monotonic() + later.after_s
                events.publish(job.id, "queued", {"position": self.store.position(job)})
        except asyncio.CancelledError:
            if job.id in self._cancel_requested:
                with contextlib.suppress(Exception):
                    await self._conclude(job, _Outcome(JobState.CANCELLED, "Cancelled", "cancelled by request"))
            else:  # the daemon is stopping: the next start runs it again (and first looks for its objects
                # when this run got as far as the worker: its output may be on its way to S3)
                self.store.requeue(job.id, count_attempt=self._phase.get(job.id) != "prepare")
        except Exception as exc:  # noqa: BLE001 - an unexpected error fails this job, not the runner
            logger.exception("asynchronous inference job %s", job.id)
            with contextlib.suppress(Exception):
                await self._conclude(job, _Outcome(JobState.FAILED, "InternalFailure", f"{type(exc).__name__}: {exc}"))
            self.store.requeue(job.id)  # only if the failure could not be recorded
        finally:
            self._tasks.pop(job.id, None)
            self._phase.pop(job.id, None)
            self._cancel_requested.discard(job.id)
            self._running.get(job.endpoint, set()).discard(job.id)
            self._wake.set()

    async def _execute(self, job: JobRecord) -> None:
        """Run the job once; raises :class:`_Outcome` when it ends, :class:`_TryLater` to queue it again."""
        if job.attempts > 0:  # a run before this one may have written the outcome before the daemon died
            try:
                done = await self._s3_call(self._exists, job.output_location)
                failed = not done and await self._s3_call(self._exists, job.failure_location)
            except S3Error as exc:
                logger.warning("asynchronous inference job %s: S3 unavailable (%s); queued again", job.id, exc.message)
                raise _TryLater(_S3_RETRY_S) from None
            if done:
                self._phase[job.id] = "finish"
                self.store.finish(job.id, JobState.SUCCEEDED)
                self.manager.events.publish(job.id, "done", {"status": 200, "output_location": job.output_location})
                return
            if failed:
                raise _Outcome(JobState.FAILED, "Failed", "failed in an earlier run (see the failure object)")
        body, content_type = await self._input(job)
        rt = self._live(job.endpoint)
        headers = {"content-type": content_type}
        if job.accept:
            headers["accept"] = job.accept
        if job.custom_attributes:
            headers["x-amzn-sagemaker-custom-attributes"] = job.custom_attributes
        canonical = None
        if rt.default_handler:
            try:  # in a thread: image references (s3://, URLs) are fetched here, before a worker sees the request
                canonical = with_fixed_seed(await asyncio.to_thread(validate_default_body, body, content_type,
                                                                    self._resolve_images))
            except InvalidRequestError as exc:
                raise _Outcome(JobState.FAILED, "ValidationError", exc.message, 400) from None
            except S3Error as exc:  # only the transient ones reach here (the S3 service or the network)
                logger.warning("asynchronous inference job %s: S3 unavailable reading an input image (%s); queued "
                               "again", job.id, exc.message)
                raise _TryLater(_S3_RETRY_S) from None
            headers["content-type"] = "application/json"
        work = work_of_body(canonical) if canonical is not None else OPAQUE_WORK
        self._phase[job.id] = "invoke"
        try:
            reply = await self.manager.invoke(rt, canonical if canonical is not None else body, headers,
                                              validated=canonical is not None, work=work, job_id=job.id,
                                              timeout_s=float(job.timeout_s))
        except QueueFullError as exc:
            raise _TryLater(float(exc.fields.get("retry_after") or 1)) from None
        except InvocationTimeoutError:
            raise _Outcome(JobState.FAILED, "ModelInvocationTimeExceeded",
                           f"the invocation did not finish within its InvocationTimeoutSeconds ({job.timeout_s} s)",
                           408) from None
        except InvocationFailedError as exc:  # the worker died under it, twice: run it again later
            logger.warning("asynchronous inference job %s: %s; queued again", job.id, exc.message)
            raise _TryLater(1.0, count_attempt=True) from None
        except InvalidRequestError as exc:  # admission: over the memory budget, or too large for the timeout
            raise _Outcome(JobState.FAILED, "ValidationError", exc.message, 400) from None
        self._phase[job.id] = "finish"
        if reply.status >= 300:
            text = reply.body[:4096].decode("utf-8", errors="replace")
            raise _Outcome(JobState.FAILED, "ModelError", f"Received error ({reply.status}) from the model: {text}",
                           reply.status)
        content = reply.headers.get("content-type", "application/json")
        try:
            await self._s3_call(self._put, job.output_location, reply.body, content)
        except S3Error as exc:
            if exc.fields.get("aws_code") in S3_TRANSIENT:
                logger.warning("asynchronous inference job %s: writing its output failed (%s); queued again", job.id,
                               exc.message)
                raise _TryLater(_S3_RETRY_S, count_attempt=True) from None
            raise _Outcome(JobState.FAILED, "OutputLocationError",
                           f"cannot write the result to {job.output_location}: {exc.message}") from None
        # the object exists now; only then is the job succeeded
        self.store.finish(job.id, JobState.SUCCEEDED)
        self.manager.events.publish(job.id, "done", {"status": 200, "output_location": job.output_location,
                                                     "content_type": content})

    def _live(self, name: str) -> Any:
        try:
            return self.manager.live_for_invoke(name)
        except QueueFullError as exc:
            raise _TryLater(float(exc.fields.get("retry_after") or 1)) from None
        except EndpointNotReadyError:
            raise _TryLater(1.0) from None
        except SdmakerError as exc:  # the endpoint was deleted meanwhile
            raise _Outcome(JobState.FAILED, "EndpointUnavailable", exc.message) from None

    async def _input(self, job: JobRecord) -> tuple[bytes, str]:
        """The request body (inline, or read from its InputLocation) and its Content-Type."""
        if job.body is not None or job.input_location is None:
            return job.body or b"", job.content_type or "application/json"
        limit = self.settings.max_body_bytes
        try:
            data, stored_type = await self._s3_call(self._get, job.input_location, limit)
        except S3Error as exc:
            if exc.fields.get("aws_code") in S3_TRANSIENT:
                raise _TryLater(_S3_RETRY_S) from None
            raise _Outcome(JobState.FAILED, "InputLocationError",
                           f"cannot read the InputLocation {job.input_location}: {exc.message}", 400) from None
        return data, job.content_type or stored_type or "application/json"

    async def _conclude(self, job: JobRecord, outcome: _Outcome) -> None:
        """Write the failure object (unless the run already wrote its output), then record the end."""
        if outcome.state is not JobState.SUCCEEDED:
            try:
                await self._s3_call(self._put, job.failure_location,
                                    _failure_body(job, outcome.code, outcome.message, outcome.status),
                                    "application/json")
            except S3Error as exc:  # recorded anyway: the status API still tells the reason
                logger.warning("asynchronous inference job %s: could not write its failure object: %s", job.id,
                               exc.message)
        if self.store.finish(job.id, outcome.state, outcome.message[:4096]):
            logger.info("asynchronous inference job %s %s: %s", job.id, outcome.state, outcome.message[:200])
            self.manager.events.publish(job.id, "error", {"status": outcome.status or 500, "code": outcome.code,
                                                          "message": outcome.message[:1024],
                                                          "state": outcome.state.value,
                                                          "failure_location": job.failure_location})

    # -- S3 (boto3 calls run in threads) -------------------------------------------------------------

    async def _s3_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def _client(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                from sdmaker.store._s3 import client_for

                # the user's S3 when configured, else the daemon's built-in one (only ever called from threads)
                self._s3 = client_for(self.settings)
            return self._s3

    def _resolve_images(self, payload: Any) -> None:
        """Fetch the request's image references into it (in a thread; see :mod:`._image_refs`)."""
        for ref in resolve_payload(payload, ImageFetcher(self.settings, self._client)):
            logger.info("asynchronous inference: fetched %s (%s bytes) for %s", ref["reference"][:200], ref["bytes"],
                        ref["field"])

    def _exists(self, uri: str) -> bool:
        from sdmaker.store._s3 import exists

        return exists(uri, client=self._client())

    def _get(self, uri: str, limit: int) -> tuple[bytes, str | None]:
        from sdmaker.store._s3 import get_bytes

        return get_bytes(uri, limit=limit, client=self._client())

    def _put(self, uri: str, data: bytes, content_type: str) -> None:
        from sdmaker.store._s3 import put_bytes

        put_bytes(uri, data, content_type=content_type, client=self._client())
