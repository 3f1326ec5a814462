"""Diffusion-aware dynamic batching: concurrent requests share UNet calls step by step.

A request-level batcher would hold early arrivals until a batch forms and keep finished requests
waiting for the slowest one. :class:`StepBatcher` batches per *denoising step* instead: one worker
thread owns the model; at every step boundary it admits waiting requests (FIFO) into the running
batch, runs one UNet call for the current step of every member (each at its own timestep, with its
own text embeddings), hands each member its slice to its own scheduler, and retires members whose
steps are done (VAE decode, result to the waiting caller). Each request keeps its seed/generators,
scheduler instance and step count, so its images equal ``generate``'s (<= 1e-4 in fp32). The loop
itself is ``sdmaker.engine._loop``'s, the same one ``generate`` runs with a single job.

Compatibility: members of one batch share the latent size (the UNet input shape); guidance mode
may differ (a CFG request just contributes two rows). Requests of another size form another *group*
(up to ``max_groups`` at once), and the groups take turns at step boundaries, weighted by their work:
each step goes to the group that has received the least work so far (rows x latent pixels, a
deterministic measure, not wall time), and a new group starts level with the least-served one. So a
huge request (large size, many steps) no longer makes small ones wait for it to finish: they
progress beside it, at about their share of the machine, and each group's results are unchanged.
Heavy steps run on a second lane. One UNet step of a huge request (1024x1024 on a CPU) can take
minutes, and a step boundary is the only place where anything else can run: turns alone would make
a small request wait for the huge one's current step. So a group whose estimated step time exceeds
``heavy_step_s`` (from the seconds per unit of work measured on this model, per size) is stepped on a
second thread, the *heavy lane*, one group at a time, together with its VAE decode, while the
batcher's own thread keeps admitting and stepping the groups much lighter than it (at most a quarter
of its work per step); groups in between wait for their fair turn. UNet calls are pure functions of their inputs, so the two lanes never share state; a lane's
jobs are touched only by that lane while its step runs.
Admission is strictly FIFO; when the head of the queue does not fit (its group is full, or there are
already ``max_groups`` groups) nothing behind it is admitted: no request waits behind later arrivals.
Bounds: ``max_batch`` images per UNet call (a larger request runs alone in its group) and
``max_queue`` waiting requests (``submit`` then raises :class:`QueueFullError`).

Cancellation and deadlines: every submitted request is a :class:`BatchJob` (a ``Future``) with a
``deadline`` and a ``cancel()``. At each step boundary the worker drops jobs that were cancelled
(:class:`GenerationCancelledError`) or whose deadline has passed (:class:`InvocationTimeoutError`),
whether still queued or running; their batch-mates carry on with the next step, unchanged. A job
whose ``on_step`` callback raises fails alone the same way. Only a failure of the shared UNet call
or VAE decode fails the whole batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sdmaker.engine._adapters import adapters_for
from sdmaker.engine._loader import LoadedModel
from sdmaker.engine._loop import (
    Job,
    as_engine_error,
    decode_jobs,
    deep_cache_interval_for,
    prepare_jobs,
    resolve,
    run_unet,
    to_result,
)
from sdmaker.engine._preview import ProgressCallback
from sdmaker.engine._result import GenerationResult, StepCallback
from sdmaker.errors import (
    ConfigError,
    EngineError,
    GenerationCancelledError,
    InvocationTimeoutError,
    QueueFullError,
    SdmakerError,
)
from sdmaker.schema import GenerateRequest, ResolvedRequest

__all__ = ["BatchJob", "BatcherStats", "StepBatcher"]

logger = logging.getLogger(__name__)

#: A group whose estimated step time is above this runs on the heavy lane (seconds).
HEAVY_STEP_S = 0.5
#: Before anything was measured on this model, a group above this much work per step (UNet rows x image
#: pixels: 2 rows of a 256x256 image) counts as heavy.
_UNMEASURED_HEAVY_WORK = 2 * 256 * 256
#: While the heavy lane steps a group, this thread steps the groups with at most 1/this of its work.
_LIGHT_RATIO = 4
#: Weight of the newest measurement in the per-size seconds-per-work estimate.
_RATE_WEIGHT = 0.5


class BatchJob(Future[GenerationResult]):
    """One submitted request: a ``Future`` of its :class:`GenerationResult`, with a deadline and ``cancel()``.

    Attributes:
        request: the resolved request.
        deadline: a ``time.monotonic()`` instant, or None. Once it has passed, the job leaves the queue or
            its batch at the next step boundary and the future fails with :class:`InvocationTimeoutError`.
            It may be changed while the job waits or runs (e.g. tightened when a client's own timeout is known).

    ``cancel(reason)`` asks the job to stop: at the next step boundary it leaves the queue or its batch and
    the future fails with :class:`GenerationCancelledError` (``cancelled()`` stays False: the answer is an
    sdmaker error, so a waiter sees why). It returns False once the job has finished. ``asyncio.wrap_future``
    calls ``cancel()`` when the awaiting task is cancelled, so a client that goes away frees its rows.
    """

    def __init__(self, request: ResolvedRequest, on_step: StepCallback | None, deadline: float | None,
                 wake: Callable[[], None], on_progress: ProgressCallback | None = None) -> None:
        super().__init__()
        self.request = request
        self.on_step = on_step
        self.on_progress = on_progress
        self.deadline = deadline
        self.enqueued = time.perf_counter()
        self._wake = wake
        self._cancel_reason: str | None = None

    def cancel(self, reason: str = "cancelled by the caller") -> bool:
        """Ask the job to leave at the next step boundary; False if it has already finished."""
        if self.done():
            return False
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self._wake()
        return True

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_reason is not None

    @property
    def images(self) -> int:
        return len(self.request.image_seeds())

    @property
    def key(self) -> tuple[int, int]:
        return (self.request.height, self.request.width)

    def stop_error(self, now: float, model: str) -> SdmakerError | None:
        """Why this job must stop now (cancelled, or past its deadline), or None to go on."""
        if self._cancel_reason is not None:
            return GenerationCancelledError(f"generation cancelled: {self._cancel_reason}", model=model)
        if self.deadline is not None and now >= self.deadline:
            return InvocationTimeoutError("generation did not finish before its deadline; it was stopped at a "
                                          "step boundary", model=model)
        return None


@dataclass
class BatcherStats:
    """Counters for metrics and benchmarks."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    cancelled: int = 0
    timed_out: int = 0
    unet_calls: int = 0
    steps: int = 0
    max_rows: int = 0
    heavy_steps: int = 0
    queue_wait_s: list[float] = field(default_factory=list)


class StepBatcher:
    """Step-level batching over one :class:`LoadedModel`; ``submit`` is thread-safe and blocking.

    Args:
        model: the loaded model; the batcher holds ``model.lock`` while it runs a step.
        max_batch: most images per UNet call (CFG rows count once).
        max_queue: most requests waiting for admission.
        max_groups: most size groups running at once (they take turns, step by step).
        deep_cache_interval: None = each request's own (resolved from the model's defaults); an int forces
            it for every request. deep_cache_branch: where the UNet is cut (shared by the batch).
        heavy_step_s: groups whose estimated step time is above this run on the heavy lane (None: never).
    """

    def __init__(self, model: LoadedModel, *, max_batch: int = 8, max_queue: int = 64, max_groups: int = 4,
                 deep_cache_interval: int | None = None, deep_cache_branch: int = 2,
                 heavy_step_s: float | None = HEAVY_STEP_S) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be >= 1", field="max_batch", value=max_batch)
        if max_queue < 1:
            raise ConfigError(f"max_queue={max_queue} must be >= 1", field="max_queue", value=max_queue)
        if max_groups < 1:
            raise ConfigError(f"max_groups={max_groups} must be >= 1", field="max_groups", value=max_groups)
        self.model = model
        self.max_batch = max_batch
        self.max_groups = max_groups
        self.max_queue = max_queue
        self.deep_cache_interval = deep_cache_interval
        self.deep_cache_branch = deep_cache_branch
        self.stats = BatcherStats()
        self._queue: collections.deque[BatchJob] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._active: list[tuple[Job, BatchJob]] = []
        #: work each running size group has received (its "virtual time"); insertion order breaks ties
        self._served: dict[tuple[int, int], float] = {}
        self.heavy_step_s = heavy_step_s
        #: measured seconds per unit of step work (rows x image pixels), per size and overall
        self._rate: dict[tuple[int, int], float] = {}
        self._any_rate: float | None = None
        #: the heavy lane: one thread, one group at a time; ``_lane_key`` is the group it is stepping
        self._lane: ThreadPoolExecutor | None = None
        self._lane_key: tuple[int, int] | None = None
        self._lane_turn: list[tuple[Job, BatchJob]] = []
        self._lane_future: Future[tuple[list[tuple[Job, BatchJob]], list[Any]]] | None = None
        self._thread = threading.Thread(target=self._run, name=f"step-batcher-{model.name}", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------------
    def submit_async(self, request: GenerateRequest, on_step: StepCallback | None = None, *,
                     timeout_s: float | None = None, deadline: float | None = None,
                     on_progress: ProgressCallback | None = None) -> BatchJob:
        """Queue ``request``; the returned :class:`BatchJob` resolves to its result (or its error).

        ``timeout_s`` (seconds from now) and ``deadline`` (a ``time.monotonic()`` instant) bound the job's
        life, queueing included; the earlier one wins. Past it, the job stops at the next step boundary
        with :class:`InvocationTimeoutError`. ``job.cancel()`` stops it with :class:`GenerationCancelledError`.
        ``on_progress`` gets the job's step reports and previews, from the batcher's thread or its heavy lane.
        """
        resolved = resolve(self.model, request)
        deep_cache_interval_for(self.model, resolved, self.deep_cache_interval)  # refuse here, not in the batch
        adapters_for(self.model, resolved)  # unknown or wrong-base adapters too (and load them off the batch's path)
        if timeout_s is not None:
            by_timeout = time.monotonic() + timeout_s
            deadline = by_timeout if deadline is None else min(deadline, by_timeout)
        job = BatchJob(resolved, on_step, deadline, self._wake, on_progress)
        with self._cond:
            if self._closed:
                raise EngineError("the batcher is closed", model=self.model.name)
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"generation queue is full ({self.max_queue} waiting); retry later",
                                     limit=self.max_queue)
            self._queue.append(job)
            self.stats.submitted += 1
            self._cond.notify_all()
        return job

    def submit(self, request: GenerateRequest, on_step: StepCallback | None = None, *,
               timeout_s: float | None = None) -> GenerationResult:
        """Generate ``request`` inside the shared batch; same result as ``generate(model, request)``."""
        return self.submit_async(request, on_step, timeout_s=timeout_s).result()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def cancel_all(self, reason: str) -> int:
        """Cancel every queued and running job (a stopping worker); each leaves at the next step boundary.

        Returns how many were asked to stop.
        """
        with self._cond:
            jobs = [*self._queue, *(job for _, job in self._active)]
        return sum(1 for job in jobs if job.cancel(reason))

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting; finish queued and running requests, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._lane is not None and not self._thread.is_alive():
            self._lane.shutdown(wait=False)

    def __enter__(self) -> StepBatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- worker -------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _reap(self) -> None:
        """Drop cancelled and expired jobs, queued or running: the step boundary. Called with the condition held."""
        now = time.monotonic()
        name = self.model.name
        keep: collections.deque[BatchJob] = collections.deque()
        stopped: list[tuple[BatchJob, SdmakerError]] = []
        for job in self._queue:
            err = job.stop_error(now, name)
            if err is None:
                keep.append(job)
            else:
                stopped.append((job, err))
        self._queue = keep
        running: list[tuple[Job, BatchJob]] = []
        for job_state, job in self._active:
            if job.key == self._lane_key:  # being stepped on the heavy lane: reaped at its next boundary
                running.append((job_state, job))
                continue
            err = job.stop_error(now, name)
            if err is None:
                running.append((job_state, job))
            else:
                stopped.append((job, err))
                logger.info("request left its batch after step %d of %d: %s", job_state.step,
                            len(job_state.timesteps), err.message)
        self._active = running
        for job, err in stopped:
            if isinstance(err, InvocationTimeoutError):
                self.stats.timed_out += 1
            else:
                self.stats.cancelled += 1
            self._answer(job, err)

    def _admit(self) -> list[BatchJob]:
        """FIFO admission at a step boundary; blocks while idle. Called with the condition held."""
        while True:
            self._collect_lane()
            self._reap()
            if self._queue or self._closed or self._runnable_keys():
                break
            self._cond.wait()
        admitted: list[BatchJob] = []
        rows: dict[tuple[int, int], int] = {}
        for job_state, job in self._active:
            rows[job.key] = rows.get(job.key, 0) + job_state.latents.shape[0]
        while self._queue:
            head = self._queue[0]
            taken = rows.get(head.key, 0)
            if head.key not in rows and len(rows) >= self.max_groups:
                break  # no room for another size group: nothing may overtake the head
            if taken and taken + head.images > self.max_batch:
                break  # its group is full: wait for room; nothing may overtake the head
            self._queue.popleft()
            admitted.append(head)
            rows[head.key] = taken + head.images
        return admitted

    @staticmethod
    def _answer(job: BatchJob, outcome: GenerationResult | BaseException) -> None:
        if job.done():
            return
        if isinstance(outcome, BaseException):
            job.set_exception(outcome)
        else:
            job.set_result(outcome)

    def _fail(self, jobs: list[BatchJob], exc: BaseException) -> None:
        err = as_engine_error(exc, self.model, [j.request for j in jobs])
        for job in jobs:
            self.stats.failed += 1
            self._answer(job, err)

    def _run(self) -> None:
        while True:
            with self._cond:
                admitted = self._admit()
                if not admitted and not self._active and self._closed:
                    return
                if not admitted and not self._runnable_keys():  # closing; the lane still holds work
                    self._cond.wait(0.05)
                    continue
            try:
                self._step(admitted)
            except BaseException as exc:  # noqa: BLE001 - every waiter must get an answer
                with self._cond:  # the heavy lane's group is not part of this step: it goes on
                    lane = {id(p) for _, p in self._lane_turn} if self._lane_key is not None else set()
                    failed = [p for _, p in self._active if id(p) not in lane]
                    failed += [p for p in admitted if all(p is not q for q in failed) and id(p) not in lane]
                    logger.exception("batch step failed; failing %d request(s)", len(failed))
                    self._active = [(j, p) for j, p in self._active if id(p) in lane]
                    self._fail(failed, exc)

    def _next_group(self, keys: set[tuple[int, int]]) -> tuple[int, int] | None:
        """The size group among ``keys`` whose turn it is: the one served least so far (ties: the older group).

        A group that just started begins level with the least-served running group, so it neither
        starves the others nor waits for them to finish.
        """
        running = {p.key for _, p in self._active}
        self._forget_idle_groups()
        floor = min(self._served.values(), default=0.0)
        for key in sorted(running - self._served.keys()):
            self._served[key] = floor
        candidates = [k for k in self._served if k in keys]
        return min(candidates, key=lambda k: self._served[k]) if candidates else None

    def _work(self, key: tuple[int, int]) -> int:
        """One step's work of a group: UNet rows x image pixels (the measure the turns use too)."""
        return sum(j.rows for j, p in self._active if p.key == key) * key[0] * key[1]

    def _is_heavy(self, key: tuple[int, int]) -> bool:
        if self.heavy_step_s is None:
            return False
        work = self._work(key)
        rate = self._rate.get(key, self._any_rate)
        if rate is None:
            return work > _UNMEASURED_HEAVY_WORK
        return work * rate > self.heavy_step_s

    def _measured(self, key: tuple[int, int], work: int, seconds: float) -> None:
        if work <= 0:
            return
        rate = seconds / work
        old = self._rate.get(key)
        self._rate[key] = rate if old is None else (1 - _RATE_WEIGHT) * old + _RATE_WEIGHT * rate
        self._any_rate = rate if self._any_rate is None else (1 - _RATE_WEIGHT) * self._any_rate + _RATE_WEIGHT * rate

    def _runnable_keys(self) -> set[tuple[int, int]]:
        """Groups this thread may step now: any while the heavy lane is free, else those much lighter than
        the lane's group (at most 1/:data:`_LIGHT_RATIO` of its work per step, a load-independent measure).
        """
        keys = {p.key for _, p in self._active}
        if self._lane_key is None:
            return keys
        limit = self._work(self._lane_key) / _LIGHT_RATIO
        return {k for k in keys - {self._lane_key} if self._work(k) <= limit}

    def _forget_idle_groups(self) -> None:
        running = {p.key for _, p in self._active}
        for key in [k for k in self._served if k not in running]:
            del self._served[key]

    def _step(self, admitted: list[BatchJob]) -> None:
        model = self.model
        with model.lock:
            if admitted:
                now = time.perf_counter()
                for p in admitted:
                    self.stats.queue_wait_s.append(now - p.enqueued)
                jobs = prepare_jobs(model, [(p.request, p.on_step) for p in admitted],
                                    deep_cache_interval=self.deep_cache_interval,
                                    deep_cache_branch=self.deep_cache_branch,
                                    progress=[p.on_progress for p in admitted])
                for job, p in zip(jobs, admitted, strict=True):
                    job.started = p.enqueued
                    self._active.append((job, p))
            with self._cond:
                key = self._next_group(self._runnable_keys())
            if key is None:
                return
            turn = [(j, p) for j, p in self._active if p.key == key]
            jobs = [j for j, _ in turn]
            work = self._work(key)
            self.stats.unet_calls += len({j.full_step for j in jobs})
            self.stats.max_rows = max(self.stats.max_rows, sum(j.rows for j in jobs))
            self.stats.steps += 1
            self._served[key] += work
            if self._lane_key is None and self._is_heavy(key):  # else it is much lighter than the lane's
                self._to_lane(key, turn, work)
                return
            started = time.perf_counter()
            run_unet(model, jobs)
            self._measured(key, work, time.perf_counter() - started)
            finished = self._after_step(turn)
            if not finished:
                return
            arrays = decode_jobs(model, [j for j, _ in finished])
        self._deliver(finished, arrays)

    def _after_step(self, turn: list[tuple[Job, BatchJob]]) -> list[tuple[Job, BatchJob]]:
        """Retire the members of a stepped group that failed or finished; returns the finished ones."""
        broken = [(j, p) for j, p in turn if j.failure is not None]
        for j, p in broken:  # its own callback failed: it leaves, the batch goes on
            self._fail([p], j.failure)  # type: ignore[arg-type]
        finished = [(j, p) for j, p in turn if j.done and j.failure is None]
        gone = {id(p) for j, p in turn if j.done or j.failure is not None}
        self._active = [(j, p) for j, p in self._active if id(p) not in gone]
        self._forget_idle_groups()
        return finished

    def _deliver(self, finished: list[tuple[Job, BatchJob]], arrays: list[Any]) -> None:
        for (job, pending), arr in zip(finished, arrays, strict=True):
            try:
                self._answer(pending, to_result(self.model, job, arr))
                self.stats.completed += 1
            except Exception as exc:  # noqa: BLE001
                self._fail([pending], exc)

    # -- the heavy lane -----------------------------------------------------------------------------
    def _to_lane(self, key: tuple[int, int], turn: list[tuple[Job, BatchJob]], work: int) -> None:
        """Step ``turn`` (and decode its finished jobs) on the heavy lane; this thread goes on meanwhile."""
        if self._lane is None:
            self._lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"heavy-lane-{self.model.name}")
        model = self.model
        self.stats.heavy_steps += 1

        def step() -> tuple[list[tuple[Job, BatchJob]], list[Any]]:
            try:
                started = time.perf_counter()
                run_unet(model, [j for j, _ in turn])
                seconds = time.perf_counter() - started
                done = [(j, p) for j, p in turn if j.done and j.failure is None]
                arrays = decode_jobs(model, [j for j, _ in done]) if done else []
                with self._cond:
                    self._measured(key, work, seconds)
                return done, arrays
            finally:
                self._wake()

        with self._cond:
            self._lane_key, self._lane_turn = key, turn
            self._lane_future = self._lane.submit(step)

    def _collect_lane(self) -> None:
        """Take in the heavy lane's finished step, if any. Called with the condition held, on this thread."""
        future = self._lane_future
        if future is None or not future.done():
            return
        turn = self._lane_turn
        self._lane_future, self._lane_key, self._lane_turn = None, None, []
        try:
            finished, arrays = future.result()
        except BaseException as exc:  # noqa: BLE001 - the shared UNet call or decode failed: its group fails
            logger.exception("heavy-lane step failed; failing %d request(s)", len(turn))
            gone = {id(p) for _, p in turn}
            self._active = [(j, p) for j, p in self._active if id(p) not in gone]
            self._forget_idle_groups()
            self._fail([p for _, p in turn], exc)
            return
        self._after_step(turn)
        self._deliver(finished, arrays)
