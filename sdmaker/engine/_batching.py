"""Diffusion-aware dynamic batching: concurrent requests share UNet calls step by step.

A request-level batcher would hold early arrivals until a batch forms and keep finished requests
waiting for the slowest one. :class:`StepBatcher` batches per *denoising step* instead: one worker
thread owns the model; at every step boundary it admits waiting requests (FIFO) into the running
batch, runs one UNet call for the current step of every member (each at its own timestep, with its
own text embeddings), hands each member its slice to its own scheduler, and retires members whose
steps are done (VAE decode, result to the waiting caller). Each request keeps its seed/generators,
scheduler instance and step count, so its images equal ``generate``'s (<= 1e-4 in fp32).

Compatibility: members of one batch share the latent size (the UNet input shape); guidance mode
may differ (a CFG request just contributes two rows). Fairness: admission is strictly FIFO; when
the head of the queue does not fit (other size, or not enough room) nothing behind it is admitted,
so the batch drains and the head runs next: no request waits behind later arrivals. Bounds:
``max_batch`` images per UNet call (a larger request runs alone) and ``max_queue`` waiting requests
(``submit`` then raises :class:`QueueFullError`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sdmaker.engine._generate import GenerationResult, StepCallback
from sdmaker.engine._loader import LoadedModel
from sdmaker.engine._loop import Job, decode_jobs, deep_cache_interval_for, prepare_jobs, run_unet, to_result
from sdmaker.errors import ConfigError, EngineError, QueueFullError, SdmakerError
from sdmaker.schema import GenerateRequest, ResolvedRequest

__all__ = ["BatcherStats", "StepBatcher"]

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: ResolvedRequest
    on_step: StepCallback | None
    future: Future[GenerationResult]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def images(self) -> int:
        return len(self.request.image_seeds())

    @property
    def key(self) -> tuple[int, int]:
        return (self.request.height, self.request.width)


@dataclass
class BatcherStats:
    """Counters for metrics and benchmarks."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    unet_calls: int = 0
    steps: int = 0
    max_rows: int = 0
    queue_wait_s: list[float] = field(default_factory=list)


class StepBatcher:
    """Step-level batching over one :class:`LoadedModel`; ``submit`` is thread-safe and blocking.

    Args:
        model: the loaded model; the batcher holds ``model.lock`` while it runs a step.
        max_batch: most images per UNet call (CFG rows count once).
        max_queue: most requests waiting for admission.
        deep_cache_interval: None = each request's own (resolved from the model's defaults); an int forces
            it for every request. deep_cache_branch: where the UNet is cut (shared by the batch).
    """

    def __init__(self, model: LoadedModel, *, max_batch: int = 8, max_queue: int = 64,
                 deep_cache_interval: int | None = None, deep_cache_branch: int = 2) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be >= 1", field="max_batch", value=max_batch)
        if max_queue < 1:
            raise ConfigError(f"max_queue={max_queue} must be >= 1", field="max_queue", value=max_queue)
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.deep_cache_interval = deep_cache_interval
        self.deep_cache_branch = deep_cache_branch
        self.stats = BatcherStats()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._active: list[tuple[Job, _Pending]] = []
        self._thread = threading.Thread(target=self._run, name=f"step-batcher-{model.name}", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------------
    def submit_async(self, request: GenerateRequest, on_step: StepCallback | None = None) -> Future[GenerationResult]:
        """Queue ``request``; the future resolves to its :class:`GenerationResult` (or its error)."""
        resolved = request if isinstance(request, ResolvedRequest) else request.resolve(self.model.defaults)
        deep_cache_interval_for(self.model, resolved, self.deep_cache_interval)  # refuse here, not in the batch
        pending = _Pending(resolved, on_step, Future())
        with self._cond:
            if self._closed:
                raise EngineError("the batcher is closed", model=self.model.name)
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"generation queue is full ({self.max_queue} waiting); retry later",
                                     limit=self.max_queue)
            self._queue.append(pending)
            self.stats.submitted += 1
            self._cond.notify_all()
        return pending.future

    def submit(self, request: GenerateRequest, on_step: StepCallback | None = None) -> GenerationResult:
        """Generate ``request`` inside the shared batch; same result as ``generate(model, request)``."""
        return self.submit_async(request, on_step).result()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting; finish queued and running requests, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> StepBatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- worker -------------------------------------------------------------------------------------
    def _admit(self) -> list[_Pending]:
        """FIFO admission at a step boundary; blocks while idle. Called with the condition held."""
        while not self._queue and not self._active and not self._closed:
            self._cond.wait()
        admitted: list[_Pending] = []
        rows = sum(j.latents.shape[0] for j, _ in self._active)
        key = self._active[0][1].key if self._active else None
        while self._queue:
            head = self._queue[0]
            if key is not None and head.key != key:
                break  # different size: let the batch drain; nothing may overtake the head
            if rows and rows + head.images > self.max_batch:
                break
            self._queue.popleft()
            admitted.append(head)
            rows += head.images
            key = head.key
        return admitted

    def _fail(self, pendings: list[_Pending], exc: BaseException) -> None:
        err = exc if isinstance(exc, SdmakerError) else EngineError(f"generation failed: {exc}",
                                                                   model=self.model.name)
        for p in pendings:
            self.stats.failed += 1
            if not p.future.done():
                p.future.set_exception(err)

    def _run(self) -> None:
        while True:
            with self._cond:
                admitted = self._admit()
                if not admitted and not self._active and self._closed:
                    return
            try:
                self._step(admitted)
            except BaseException as exc:  # noqa: BLE001 - every waiter must get an answer
                logger.exception("batch step failed; failing %d request(s)", len(self._active) + len(admitted))
                failed = [p for _, p in self._active]
                failed += [p for p in admitted if all(p is not q for q in failed)]
                self._active = []
                self._fail(failed, exc)

    def _step(self, admitted: list[_Pending]) -> None:
        model = self.model
        with model.lock:
            if admitted:
                now = time.perf_counter()
                for p in admitted:
                    self.stats.queue_wait_s.append(now - p.enqueued)
                jobs = prepare_jobs(model, [(p.request, p.on_step) for p in admitted],
                                    deep_cache_interval=self.deep_cache_interval,
                                    deep_cache_branch=self.deep_cache_branch)
                for job, p in zip(jobs, admitted, strict=True):
                    job.started = p.enqueued
                    self._active.append((job, p))
            if not self._active:
                return
            jobs = [j for j, _ in self._active]
            self.stats.unet_calls += len({j.full_step for j in jobs})
            self.stats.max_rows = max(self.stats.max_rows, sum(j.rows for j in jobs))
            run_unet(model, jobs)
            self.stats.steps += 1
            finished = [(j, p) for j, p in self._active if j.done]
            if not finished:
                return
            self._active = [(j, p) for j, p in self._active if not j.done]
            arrays = decode_jobs(model, [j for j, _ in finished])
        for (job, pending), arr in zip(finished, arrays, strict=True):
            try:
                pending.future.set_result(to_result(model, job, arr))
                self.stats.completed += 1
            except Exception as exc:  # noqa: BLE001
                self._fail([pending], exc)
