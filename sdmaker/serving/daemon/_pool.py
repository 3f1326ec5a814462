"""The dispatcher of one endpoint variant: N :class:`~._worker_process.Worker` processes, their restarts, and
one request per free slot.

A request waits (bounded by its invocation budget) for a free slot, is forwarded to that worker with the
headers SageMaker forwards, and its slot is returned only if the worker is still the process that took it:
a worker that died mid-request loses its slots and its monitor offers fresh ones once it is restarted.

Failures (issue 11: one request never takes down the others):

* the worker is told the seconds left of the budget (:data:`~sdmaker.serving._protocol.DEADLINE_HEADER`);
  the default handler stops that request at its next step boundary and answers a timeout, while the
  worker and the request's batch-mates carry on. The caller is answered at the deadline either way; the
  slot comes back when the worker answers. The worker is killed only if it stops answering entirely: no
  reply and no ``/ping`` within :data:`REPLY_GRACE_S` after the deadline;
* a request whose worker died under it (broken connection) is sent once more, to a healthy worker;
  default-handler bodies carry a seed fixed by the daemon, so the retry gives the same image;
* a dead worker's slots are never handed out: liveness is the process's real state (``waitid``), not
  whether asyncio has reaped it yet, and the worker is marked lost the moment a connection to it breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from sdmaker.errors import ERROR_CODE_HEADER, InvocationFailedError, InvocationTimeoutError, WorkerStartError
from sdmaker.serving._protocol import (
    DEADLINE_HEADER,
    FRAMES_MEDIA_TYPE,
    JOB_ID_HEADER,
    PROGRESS_HEADER,
    TIMEOUT_STATUS,
    VALIDATED_HEADER,
    FrameReader,
)
from sdmaker.serving._worker_secret import auth_header
from sdmaker.serving.daemon._standby import StandbyPool
from sdmaker.serving.daemon._worker_process import FORWARDED_HEADERS, Worker, WorkerReply, WorkerSpec, WorkerState

__all__ = ["REPLY_GRACE_S", "ChunkCallback", "EventCallback", "WorkerPool"]

logger = logging.getLogger(__name__)

#: Restart backoff: first retry after 0.5 s, doubling, at most this many consecutive failed restarts.
_MAX_RESTARTS_IN_A_ROW = 5
#: After a request's deadline, how long its worker may go without answering it before the daemon asks
#: ``/ping``; a worker that answers neither is killed (it is stuck, e.g. in a C loop holding the GIL).
REPLY_GRACE_S = 10.0
#: A worker's reply is awaited by the pool itself (deadline, then grace), not by an HTTP read timeout.
_FORWARD_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=5.0)


#: ``on_event(type, data)``: a progress event of the request (called on the daemon's loop).
EventCallback = Callable[[str, dict[str, Any]], None]
#: ``await on_chunk(data)``: the next chunk of a streamed body.
ChunkCallback = Callable[[bytes], Awaitable[None]]


class _WorkerDied(Exception):
    """The connection to the worker broke mid-request: the request may be sent once more elsewhere."""


class WorkerPool:
    """The N workers of one endpoint variant, and the one-request-per-worker dispatcher."""

    def __init__(self, spec: WorkerSpec, count: int, *, tag: str, on_change: Callable[[], None] | None = None,
                 standbys: StandbyPool | None = None) -> None:
        self.spec = spec
        self.tag = tag
        self.workers = [Worker(spec, i, tag, standbys) for i in range(count)]
        self._standbys = standbys
        self._next_index = count  # a worker added by resize() gets a fresh index (its own status file)
        self._retiring: set[Worker] = set()  # removed by resize(), draining their in-flight requests
        self._resize_lock = asyncio.Lock()
        self._old_clients: list[httpx.AsyncClient] = []  # replaced by a larger one; closed with the pool
        # woken whenever a slot frees up or a worker (re)starts: waiting requests then pick a worker
        self._room = asyncio.Condition()
        #: pixels (height x width x images) each worker holds now, by index; ``budget_pixels`` caps it
        self._held: dict[int, int] = {w.index: 0 for w in self.workers}
        self.budget_pixels: int | None = None
        self._client = self._new_client(count)
        self._client_workers = count
        self._monitors: dict[Worker, asyncio.Task[None]] = {}
        self._closing = False
        self._on_change = on_change
        self.in_flight = 0
        self._wakers: set[asyncio.Future[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()  # requests answered at their deadline, worker still busy

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn every worker and wait until all are ready; on any failure stop all and re-raise."""
        try:
            for w in self.workers:
                await w.spawn()
            await asyncio.gather(*(w.wait_ready(self._client) for w in self.workers))
        except BaseException:
            await self.close()
            raise
        for w in self.workers:
            self._serve(w)

    def _new_client(self, workers: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(limits=httpx.Limits(max_connections=max(1, workers) * self.spec.slots * 2 + 4),
                                 timeout=httpx.Timeout(10.0))

    def _serve(self, worker: Worker) -> None:
        """A ready ``worker`` takes requests, and its monitor restarts it whenever it exits."""
        self._offer(worker)
        self._monitors[worker] = asyncio.create_task(self._monitor(worker), name=f"monitor-{self.tag}-{worker.index}")

    async def resize(self, count: int, *, drain_s: float) -> None:
        """Grow or shrink to ``count`` workers (0 allowed) without dropping a request (autoscaling).

        Growing: new workers start (from warm standbys when they fit) and take requests once ready; if one
        fails to start, all the new ones are stopped and :class:`~sdmaker.errors.WorkerStartError` is raised.
        Shrinking: the workers to retire (not serving first, then the least busy, the newest) leave the
        dispatcher at once, so no new request goes to them; they stop once their in-flight requests are
        answered, or after ``drain_s`` (a request still running then is retried on another worker, as after
        any worker death). One resize at a time.
        """
        async with self._resize_lock:
            if self._closing:
                return
            if count > len(self.workers):
                await self._grow(count - len(self.workers))
            elif count < len(self.workers):
                await self._shrink(len(self.workers) - count, drain_s)

    async def _grow(self, extra: int) -> None:
        new = [Worker(self.spec, self._next_index + i, self.tag, self._standbys) for i in range(extra)]
        self._next_index += extra
        if len(self.workers) + extra > self._client_workers:  # more connections: a larger client from now on
            self._old_clients.append(self._client)
            self._client_workers = len(self.workers) + extra
            self._client = self._new_client(self._client_workers)
        for w in new:
            self._held[w.index] = 0
        self.workers.extend(new)  # Starting: the dispatcher skips them until they are ready
        try:
            for w in new:
                await w.spawn()
            await asyncio.gather(*(w.wait_ready(self._client) for w in new))
        except BaseException:
            self.workers = [w for w in self.workers if w not in new]
            await asyncio.gather(*(w.stop() for w in new), return_exceptions=True)
            raise
        for w in new:
            self._serve(w)

    async def _shrink(self, fewer: int, drain_s: float) -> None:
        order = sorted(self.workers, key=lambda w: (w.serving, w.inflight, -w.index))
        retire = order[:fewer]
        self.workers = [w for w in self.workers if w not in retire]  # no new request goes to them
        self._retiring.update(retire)
        for w in retire:
            monitor = self._monitors.pop(w, None)
            if monitor is not None:
                monitor.cancel()
        deadline = time.monotonic() + drain_s
        while any(w.inflight > 0 and w.alive for w in retire) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(w.stop() for w in retire), return_exceptions=True)
        for w in retire:
            self._retiring.discard(w)
            self._held.pop(w.index, None)
        self._wake()  # requests waiting on a retired worker's slot pick another worker

    async def close(self, *, drain_s: float = 0.0) -> None:
        """Stop all workers; with ``drain_s`` first let in-flight requests finish (blue/green swap)."""
        self._closing = True
        deadline = time.monotonic() + drain_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in [*self._monitors.values(), *self._settling]:
            task.cancel()
        await asyncio.gather(*(w.stop() for w in [*self.workers, *self._retiring]), return_exceptions=True)
        for client in [*self._old_clients, self._client]:
            await client.aclose()

    async def _monitor(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it exits while the pool is open."""
        failures = 0
        while not self._closing:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self._closing:
                return
            logger.warning("endpoint worker %s-%d (pid %d) exited with code %s; restarting", self.tag,
                           worker.index, worker.proc.pid, code)
            self._changed()
            while not self._closing:
                worker.restarting()
                await asyncio.sleep(min(0.5 * 2 ** failures, 10.0))
                try:
                    await worker.spawn()
                    await worker.wait_ready(self._client)
                except WorkerStartError as exc:
                    failures += 1
                    worker.start_failed(exc.message)
                    if failures >= _MAX_RESTARTS_IN_A_ROW:
                        worker.give_up()
                        logger.error("endpoint worker %s-%d failed %d restarts in a row: %s", self.tag,
                                     worker.index, failures, exc.message)
                        self._changed()
                        return
                    continue
                failures = 0
                if worker not in self.workers:  # retired by resize() meanwhile
                    await worker.stop()
                    return
                self._offer(worker)
                self._changed()
                break

    def _offer(self, worker: Worker) -> None:
        """A (re)started ``worker`` takes requests: wake the requests waiting for one."""
        self._wake()

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._room:
                self._room.notify_all()

        task = asyncio.ensure_future(notify())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # -- dispatch ------------------------------------------------------------------------------

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers if w.serving)

    @property
    def capacity(self) -> int:
        """Requests the workers take at once (beyond that, requests queue)."""
        return len(self.workers) * self.spec.slots

    def _pick(self, pixels: int) -> Worker | None:
        """The least-loaded serving worker with a free slot and room for ``pixels`` (None: wait).

        Least in flight first, then least pixels held, then fewest served: load spreads across workers
        instead of going to whichever freed a slot first (issue 11: with 2 workers one served 44 of 54).
        A worker holding nothing always has room: a request over the budget alone was refused at admission.
        """
        best: Worker | None = None
        for w in self.workers:
            if not w.serving or w.inflight >= self.spec.slots:
                continue
            held = self._held.get(w.index, 0)
            if self.budget_pixels is not None and held and held + pixels > self.budget_pixels:
                continue
            if best is None or (w.inflight, held, w.served) < (best.inflight, self._held.get(best.index, 0),
                                                               best.served):
                best = w
        return best

    @property
    def free_slots(self) -> int:
        return sum(max(0, self.spec.slots - w.inflight) for w in self.workers if w.serving)

    @property
    def waiting(self) -> int:
        """Requests in this pool not yet on a worker (waiting for a slot or for memory room)."""
        return max(0, self.in_flight - sum(w.inflight for w in self.workers))

    async def _acquire(self, deadline: float, pixels: int = 0) -> tuple[Worker, int]:
        async with self._room:
            while True:
                # no worker at all (scaled to zero): wait while the autoscaler starts one
                if self.workers and all(w.state == WorkerState.FAILED for w in self.workers):
                    raise InvocationFailedError("every worker of this endpoint failed to restart; see endpoint "
                                                "logs", original_status=500)
                worker = self._pick(pixels)
                if worker is not None:
                    worker.take_slot()
                    self._held[worker.index] = self._held.get(worker.index, 0) + pixels
                    return worker, worker.generation
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                # woken by a freed slot or a restart; re-checked at least every second (a worker that died)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._room.wait(), min(remaining, 1.0))

    async def invoke(self, body: bytes, headers: Mapping[str, str], *, timeout_s: float,
                     validated: bool = False, pixels: int = 0, job_id: str | None = None,
                     on_event: EventCallback | None = None, on_chunk: ChunkCallback | None = None) -> WorkerReply:
        """Send one invocation to an idle worker and return its reply (any status).

        The least-loaded worker with a free slot takes it (:meth:`_pick`); ``pixels`` (height x width x images)
        count against its :attr:`budget_pixels` while it runs. The reply carries the request's time on its
        worker and how many requests that worker ran meanwhile (the admission's throughput samples).

        Only the headers SageMaker forwards reach the worker, plus :data:`VALIDATED_HEADER` when ``validated``
        (a caller's own copy of that header is dropped like any other) and :data:`DEADLINE_HEADER`.

        Progress: the worker answers in frames (:data:`PROGRESS_HEADER`) and every progress event it reports
        while the request runs goes to ``on_event(type, data)`` at once (``started`` when a worker takes the
        request, then the worker's ``step``/``preview`` events); a streaming ``predict_fn``'s chunks go to
        ``on_chunk(bytes)`` as they come (without ``on_chunk`` they are joined into the reply's body).
        ``job_id`` reaches the worker as :data:`JOB_ID_HEADER`.

        Raises:
            InvocationTimeoutError: no reply within ``timeout_s`` (waiting included), or the worker stopped the
                request at its deadline. The worker is not killed for it (see the module docstring).
            InvocationFailedError: the worker died mid-request, twice (the request is retried once).
        """
        deadline = time.monotonic() + timeout_s
        self.in_flight += 1
        try:
            try:
                return await self._attempt(body, headers, deadline, timeout_s, validated, pixels, job_id, on_event,
                                           on_chunk)
            except _WorkerDied as first:
                logger.warning("endpoint %s: %s; sending the request to another worker", self.tag, first)
            try:
                return await self._attempt(body, headers, deadline, timeout_s, validated, pixels, job_id, on_event,
                                           on_chunk)
            except _WorkerDied as second:
                raise InvocationFailedError(f"{second} (after a retry)", original_status=500) from None
        finally:
            self.in_flight -= 1

    async def _attempt(self, body: bytes, headers: Mapping[str, str], deadline: float, timeout_s: float,
                       validated: bool, pixels: int, job_id: str | None = None, on_event: EventCallback | None = None,
                       on_chunk: ChunkCallback | None = None) -> WorkerReply:
        try:
            worker, generation = await self._acquire(deadline, pixels)  # takes the slot
        except asyncio.TimeoutError:
            raise InvocationTimeoutError(
                f"no worker became free within the invocation timeout of {timeout_s:g} s",
                timeout_s=timeout_s) from None
        served_from = time.monotonic()
        load_at_start = worker.inflight
        fwd = {k: v for k, v in headers.items() if k.lower() in FORWARDED_HEADERS}
        fwd.update(auth_header(worker.secret))
        if validated:
            fwd[VALIDATED_HEADER] = "1"
        fwd[DEADLINE_HEADER] = f"{max(deadline - time.monotonic(), 0.0):.3f}"
        fwd[PROGRESS_HEADER] = "frames"
        if job_id:
            fwd[JOB_ID_HEADER] = job_id
        if on_event is not None:
            on_event("started", {"worker": worker.index})
        post = asyncio.ensure_future(self._exchange(worker, body, fwd, on_event, on_chunk))
        try:
            done, _ = await asyncio.wait({post}, timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.CancelledError:  # the caller went away: the slot is free once the worker has answered
            self._settle_later(worker, generation, post, pixels)
            raise
        if not done:
            logger.warning("endpoint worker %s-%d: request past its %g s timeout; answered as a timeout, the "
                           "worker finishes it at its next step boundary", self.tag, worker.index, timeout_s)
            self._settle_later(worker, generation, post, pixels)
            raise InvocationTimeoutError(f"invocation timed out after {timeout_s:g} s", timeout_s=timeout_s)
        exc = post.exception()
        load_at_end = worker.inflight
        if isinstance(exc, httpx.PoolTimeout):  # the daemon's own connection pool was busy: the worker is fine
            self._release(worker, generation, pixels, healthy=True)
            raise InvocationTimeoutError(f"no connection to worker {worker.index} became free",
                                         timeout_s=timeout_s) from exc
        if isinstance(exc, httpx.TransportError):
            worker.lost(generation)  # a broken connection means a broken worker: its monitor restarts it
            self._release(worker, generation, pixels, healthy=False)
            raise _WorkerDied(f"worker {worker.index} died while serving the request ({type(exc).__name__})") from exc
        self._release(worker, generation, pixels, healthy=exc is None)
        if exc is not None:
            raise exc
        reply = post.result()
        if reply.status_code == TIMEOUT_STATUS and reply.headers.get(ERROR_CODE_HEADER) == "InvocationTimeoutError":
            raise InvocationTimeoutError(f"invocation timed out after {timeout_s:g} s; the worker stopped it at a "
                                         "step boundary", timeout_s=timeout_s)
        return WorkerReply(status=reply.status_code, headers=dict(reply.headers), body=reply.content,
                           worker=worker.index, service_s=time.monotonic() - served_from,
                           concurrency=(load_at_start + load_at_end) / 2,
                           streamed=reply.extensions.get("sdmaker_streamed", False))

    async def _exchange(self, worker: Worker, body: bytes, headers: dict[str, str], on_event: EventCallback | None,
                        on_chunk: ChunkCallback | None) -> httpx.Response:
        """POST the request and read the worker's framed answer: events and chunks as they come, then the reply.

        Returns the reply as a plain ``httpx.Response`` (status, headers, body); an answer that is not framed
        (an error before the handler ran: 403, 413, 503) is returned as it is. A stream that ends before its
        reply frame is a broken worker (``httpx.RemoteProtocolError``).
        """
        request = self._client.build_request("POST", f"{worker.url}/invocations", content=body, headers=headers,
                                             timeout=_FORWARD_TIMEOUT)
        response = await self._client.send(request, stream=True)
        try:
            if response.headers.get("content-type", "").split(";")[0] != FRAMES_MEDIA_TYPE:
                content = await response.aread()
                return httpx.Response(response.status_code, headers=response.headers, content=content)
            reader = FrameReader()
            chunks: list[bytes] = []
            async for data in response.aiter_raw():
                for head, payload in reader.feed(data):
                    kind = head.get("kind")
                    if kind == "event" and on_event is not None:
                        on_event(str(head.get("type")), dict(head.get("data") or {}))
                    elif kind == "chunk":
                        if on_chunk is not None:
                            await on_chunk(payload)
                        else:
                            chunks.append(payload)
                    elif kind == "reply":
                        reply_headers = dict(head.get("headers") or {})
                        reply_headers["content-type"] = str(head.get("content_type") or "application/json")
                        streamed = bool(head.get("streamed")) and on_chunk is not None
                        reply = httpx.Response(int(head["status"]), headers=reply_headers,
                                               content=b"".join(chunks) + payload)
                        reply.extensions["sdmaker_streamed"] = streamed
                        return reply
            raise httpx.RemoteProtocolError("the worker's answer ended before its reply frame")
        finally:
            await response.aclose()

    def _release(self, worker: Worker, generation: int, pixels: int, *, healthy: bool) -> None:
        self._held[worker.index] = max(0, self._held.get(worker.index, 0) - pixels)
        worker.release_slot(generation, healthy=healthy)
        self._wake()

    def _settle_later(self, worker: Worker, generation: int, post: asyncio.Future[httpx.Response],
                      pixels: int) -> None:
        task = asyncio.create_task(self._settle(worker, generation, post, pixels),
                                   name=f"settle-{self.tag}-{worker.index}")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, worker: Worker, generation: int, post: asyncio.Future[httpx.Response],
                      pixels: int) -> None:
        """Wait for the reply of a request its caller no longer waits for; free its slot then.

        Kills the worker only when it answers neither the request nor ``/ping`` for :data:`REPLY_GRACE_S`.
        """
        healthy = False
        try:
            while True:
                done, _ = await asyncio.wait({post}, timeout=REPLY_GRACE_S)
                if done:
                    healthy = post.exception() is None
                    break
                if generation != worker.generation or not worker.alive:
                    break
                if not await self._answers_ping(worker):
                    logger.warning("endpoint worker %s-%d answers neither its request nor /ping; killing it",
                                   self.tag, worker.index)
                    break
                logger.info("endpoint worker %s-%d is still busy with a request past its deadline (it answers "
                            "/ping)", self.tag, worker.index)
        finally:
            if not healthy:
                post.cancel()
                worker.lost(generation)
            self._release(worker, generation, pixels, healthy=healthy)

    async def _answers_ping(self, worker: Worker) -> bool:
        try:
            reply = await self._client.get(f"{worker.url}/ping", timeout=REPLY_GRACE_S)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200
