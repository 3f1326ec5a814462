"""The endpoint manager: SageMaker's model -> endpoint config -> endpoint, run as local worker pools.

Life of an endpoint (``EndpointStatus``): ``Creating`` (model resolved, workers loading) -> ``InService``
or ``Failed`` (``FailureReason`` = the worker's own error); ``UpdateEndpoint`` -> ``Updating`` while the
new workers load next to the old ones (blue/green: the old pool serves until the new one is ready, then
drains) -> ``InService``; ``DeleteEndpoint`` -> gone. State lives in SQLite (:mod:`._state`), so a
restarted daemon brings its endpoints back (status ``Creating`` until their workers are ready again).

Instance types map to a local profile: ``ml.g*``/``ml.p*``/``ml.inf*``/``ml.trn*`` (accelerated) run with
device ``auto`` (CUDA when present, else CPU with a warning); every other type (``ml.m5.*``, ``ml.c5.*``,
``local``) runs on the CPU. ``InitialInstanceCount`` (times ``SAGEMAKER_MODEL_SERVER_WORKERS``, default 1)
is the number of worker processes; each gets ``cores / workers`` torch threads (``OMP_NUM_THREADS``, unless the
model's Environment or the daemon's environment sets it). Per-endpoint limits come from the model's ``Environment``:
``SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS`` (invocation timeout) and ``SDMAKER_MAX_QUEUE``.

Step batching: ``SDMAKER_MAX_BATCH`` in the model's Environment starts workers with ``max_batch=N``
(concurrent requests share UNet steps, and the pool sends each worker up to N requests at once). The
default is :data:`DEFAULT_MAX_BATCH` for the default handler (measured in bench/results.json, "batching
mini": 2.7x images/s with 8 clients; 1.14x on the SD 2.1 architecture) and 0 (off) for models with a
``code/inference.py``: their hooks are opaque and may not be safe to run concurrently, so they batch
only when the model's Environment asks for it.

Cold start: the manager keeps ``SDMAKER_STANDBY_WORKERS`` warm standby processes (:mod:`._standby`)
with the environment a default model's worker gets; a worker whose interpreter and import-time
environment match takes one and only has to load its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import (
    ConfigError,
    EndpointExistsError,
    EndpointNotFoundError,
    EndpointNotReadyError,
    InvalidRequestError,
    QueueFullError,
    SdmakerError,
)
from sdmaker.serving.daemon._admission import BATCH_SIZE_GROUPS, OPAQUE_WORK, Work, worker_memory_floor
from sdmaker.serving.daemon._autoscaler import Autoscaler
from sdmaker.serving.daemon._events import EventHub
from sdmaker.serving.daemon._live import LiveEndpoint
from sdmaker.serving.daemon._logs import rotate_if_large
from sdmaker.serving.daemon._multi_model import MultiModelPool, is_multi_model
from sdmaker.serving.daemon._pool import ChunkCallback, WorkerPool
from sdmaker.serving.daemon._progress import done_event
from sdmaker.serving.daemon._scaling import ScalingTarget
from sdmaker.serving.daemon._standby import StandbyPool
from sdmaker.serving.daemon._state import EndpointRecord, EndpointStats, EndpointStatus, StateDB
from sdmaker.serving.daemon._transform import TransformJobs
from sdmaker.serving.daemon._variant import (
    DEFAULT_MAX_BATCH,
    FORBIDDEN_ENV,
    VariantPlan,
    instance_profile,
    memory_budget_for,
    model_ref,
    plan_variant,
    python_for,
    resolve_model_dir,
    worker_environment,
)
from sdmaker.serving.daemon._worker_process import WorkerReply, WorkerSpec
from sdmaker.serving.daemon.ray._cluster import RayCluster
from sdmaker.serving.daemon.ray._pool import Pool

__all__ = ["DEFAULT_MAX_BATCH", "FORBIDDEN_ENV", "EndpointManager", "LiveEndpoint", "instance_profile"]

logger = logging.getLogger(__name__)

#: How often the daemon checks the size of endpoint logs.
_HOUSEKEEPING_EVERY_S = 5.0


class EndpointManager:
    """Creates, updates, deletes and invokes endpoints. One per daemon (lives in the app's lifespan state)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.endpoints_dir
        self.db = StateDB(self.root / "state.sqlite3")
        self.live: dict[str, LiveEndpoint] = {}
        #: per-job progress logs read by SSE, response streaming, the OpenAI API, the UI and job status
        self.events = EventHub()
        self._generation = 0
        #: the Ray cluster endpoints run on (``sdmaker up --ray``); None: local worker processes
        self.ray: RayCluster | None = RayCluster(settings) if settings.ray_address else None
        self.standbys = StandbyPool(count=0 if self.ray else settings.standby_workers, python=sys.executable,
                                    env=worker_environment(settings, {}, 1), log_file=self.root / "standby.log")
        self._standby_task: asyncio.Task[None] | None = None
        self._rotate_task: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._stats_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        #: batch transform jobs (CreateTransformJob), each on its own workers
        self.transforms = TransformJobs(settings, self.db, self.root, self.standbys)
        #: scalable targets, policies, activities and the local target-tracking loop (._autoscaler)
        self.scaling = Autoscaler(self)

    # -- lifecycle of the manager ------------------------------------------------------------------

    async def start(self) -> None:
        """Bring back every endpoint that was serving (or starting) when the daemon last stopped."""
        if self.ray is not None:
            await asyncio.to_thread(self.ray.connect)
        for rec in self.db.endpoints():
            if rec.status is not EndpointStatus.FAILED:
                logger.info("restoring endpoint %s", rec.name)
                self._launch(rec.name, rec.config_name, restore=True)
                self._set_status(rec.name, EndpointStatus.CREATING, failure_reason=None)
        restoring = [rt.task for rt in self.live.values() if rt.task is not None]
        self.transforms.start()  # resume the transform jobs that were running
        self._standby_task = asyncio.create_task(self._start_standbys(restoring), name="standby-start")
        if self.settings.log_max_bytes > 0:
            self._rotate_task = asyncio.create_task(self._rotate_logs(), name="log-rotation")
        self.scaling.start()

    async def _write_stats(self) -> None:
        """Write every endpoint's changed statistics off the event loop: a group commit of finished requests.

        Write-through with one pending write coalesced: requests that finish while a write runs are all covered
        by the next one. Each request's answer waits for the write that includes it (one SQLite transaction,
        a few ms, shared by a burst), so a SIGKILL loses no answered request's counts.
        """
        while self._stats_waiters:
            waiters, self._stats_waiters = self._stats_waiters, []
            changed = self._unsaved_stats()
            try:
                if changed:
                    await asyncio.to_thread(self._save_stats, changed)
            except Exception:  # noqa: BLE001 - statistics must never fail a request or the daemon
                logger.exception("saving endpoint statistics failed")
            finally:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        self._stats_task = None

    def _stats_changed(self) -> asyncio.Future[None]:
        """A request finished: a future that resolves once a write including it is done."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if self._closed:  # close() writes what is left
            waiter.set_result(None)
            return waiter
        self._stats_waiters.append(waiter)
        if self._stats_task is None:
            self._stats_task = loop.create_task(self._write_stats(), name="stats")
        return waiter

    def _unsaved_stats(self) -> list[tuple[str, EndpointStats]]:
        """Stats of the endpoints that served requests since their last save, marked as saved."""
        out = []
        for name, rt in self.live.items():
            if rt.invocations != rt.saved_invocations:
                rt.saved_invocations = rt.invocations
                out.append((name, rt.stats()))
        return out

    def _save_stats(self, changed: list[tuple[str, EndpointStats]]) -> None:
        for name, stats in changed:
            self.db.save_stats(name, stats)

    async def _rotate_logs(self) -> None:
        """Keep every endpoint log (and the standby log) under ``SDMAKER_LOG_MAX_BYTES``, checked every few
        seconds: workers write to these files directly, so the daemon is the only one that can cap them."""
        while True:
            await asyncio.sleep(_HOUSEKEEPING_EVERY_S)
            for path in [self.root / "standby.log", *(self.log_file(name) for name in self.live)]:
                await asyncio.to_thread(rotate_if_large, path, self.settings.log_max_bytes)

    async def _start_standbys(self, restoring: list[asyncio.Task[None]]) -> None:
        """Start the standbys once restored endpoints loaded (their imports would slow those loads down)."""
        await asyncio.gather(*restoring, return_exceptions=True)
        self.standbys.start()

    async def close(self) -> None:
        """Stop every worker; the database keeps the endpoints for the next start."""
        self._closed = True
        await self.scaling.close()  # before the pools: a resize in progress stops the workers it started
        for background in (self._standby_task, self._rotate_task):
            if background is not None:
                background.cancel()
        if self._stats_task is not None:  # let a write in progress end, then write what is left
            with contextlib.suppress(Exception):
                await self._stats_task
        self._save_stats(self._unsaved_stats())
        await self.transforms.close()
        await self.standbys.close()
        tasks = [rt.task for rt in self.live.values() if rt.task is not None]
        for task in tasks:
            task.cancel()  # a pool still starting stops its own workers when cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(rt.pool.close() for rt in self.live.values() if rt.pool),
                             return_exceptions=True)
        self.live.clear()
        if self.ray is not None:
            await asyncio.to_thread(self.ray.close)
        self.db.close()

    # -- helpers -----------------------------------------------------------------------------------

    def log_file(self, name: str) -> Path:
        return self.root / name / "endpoint.log"

    def _set_status(self, name: str, status: EndpointStatus, **fields: Any) -> None:
        """The one way an endpoint's status changes: stored record and live copy together."""
        self.db.set_endpoint(name, status=status, **fields)
        live = self.live.get(name)
        if live is not None:
            live.status = status

    def _log(self, name: str, text: str) -> None:
        path = self.log_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def _variant(self, config_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(production variant, model body) of a config; raises ConfigError when either is gone."""
        config = self.db.get("endpoint_configs", config_name)
        if config is None:
            raise ConfigError(f"endpoint configuration {config_name!r} does not exist", field="EndpointConfigName")
        variant = config.body["ProductionVariants"][0]
        model = self.db.get("models", variant["ModelName"])
        if model is None:
            raise ConfigError(f"model {variant['ModelName']!r} of endpoint configuration {config_name!r} does not "
                              "exist", field="ModelName")
        return variant, model.body

    def _multi_model_pool(self, name: str, prefix: str, variant: dict[str, Any], model: dict[str, Any]) -> Pool:
        """A multi-model endpoint's pool: nothing loads until a request names a target model (._multi_model)."""
        if self.ray is not None:
            raise ConfigError("multi-model endpoints (Mode MultiModel) run on the local backend only, not on Ray",
                              field="Mode")
        self._log(name, f"multi-model endpoint on {prefix}: target models load on first use")
        self.db.set_endpoint(name, model_digest=None, model_path=prefix)
        return MultiModelPool(endpoint=name, prefix=prefix, variant=variant, model=model, settings=self.settings,
                              run_dir=self.root / name / "run", log=lambda text: self._log(name, text),
                              log_file=self.log_file(name), standbys=self.standbys)

    async def _build_pool(self, name: str, config_name: str) -> tuple[Pool, VariantPlan | None]:
        """Resolve the model, prepare its environment, start its workers; a ready pool and the plan it follows."""
        variant, model = self._variant(config_name)
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        ref = model_ref(container)
        if is_multi_model(container):
            return self._multi_model_pool(name, ref, variant, model), None
        self._log(name, f"resolving model data {ref}")
        model_dir, digest, display_name = await asyncio.to_thread(resolve_model_dir, ref, self.settings)
        python = await asyncio.to_thread(python_for, model_dir, self.settings)
        plan = plan_variant(variant, model, model_dir=model_dir, digest=digest, display_name=display_name,
                            log_file=self.log_file(name), settings=self.settings)
        self._generation += 1
        if self.ray is not None:
            ray_pool = self.ray.pool_for(name, self._generation, plan, container=container, model_ref=ref,
                                         model_dir=model_dir, digest=digest)
            self._log(name, f"starting {ray_pool.count} Ray Serve replica(s) of {ray_pool.resources} for model "
                            f"{plan.model_name} ({model_dir})")
            await ray_pool.start()
            self.db.set_endpoint(name, model_digest=digest, model_path=str(model_dir))
            return ray_pool, plan
        if plan.warning:
            logger.warning("endpoint %s: %s", name, plan.warning)
            self._log(name, f"warning: {plan.warning}")
        spec = WorkerSpec(config=plan.config, python=python, run_dir=self.root / name / "run",
                          startup_timeout_s=plan.startup_timeout_s)
        # a scaled count (stored, or within a scalable target's bounds) wins over InitialInstanceCount
        instances = self.scaling.initial_instances(name, str(variant.get("VariantName", "AllTraffic")),
                                                   plan.count // plan.workers_per_instance)
        if instances * plan.workers_per_instance != plan.count:
            count = instances * plan.workers_per_instance
            budget = await asyncio.to_thread(memory_budget_for, plan, count)
            plan = dataclasses.replace(plan, count=count, memory_budget_pixels=budget)
        pool = WorkerPool(spec, plan.count, tag=f"v{self._generation}", standbys=self.standbys)
        max_batch = plan.config.max_batch
        batching = f", step batching up to {max_batch} requests per worker" if max_batch else ""
        self._log(name, f"starting {plan.count} worker(s) for model {plan.model_name} ({model_dir}){batching}")
        await pool.start()
        self.db.set_endpoint(name, model_digest=digest, model_path=str(model_dir))
        return pool, plan

    def _launch(self, name: str, config_name: str, *, restore: bool = False) -> LiveEndpoint:
        rt = LiveEndpoint(name=name, timeout_s=self.settings.invocation_timeout_s,
                          max_queue=self.settings.max_queue)
        saved = self.db.stats(name) if restore else None
        if saved is not None:  # a daemon restart: the endpoint keeps its counts and recent latencies
            rt.restore_stats(saved)
        self.live[name] = rt
        rt.task = asyncio.create_task(self._bring_up(name, config_name, rt), name=f"create-{name}")
        return rt

    async def _bring_up(self, name: str, config_name: str, rt: LiveEndpoint) -> None:
        started = time.monotonic()
        try:
            pool, plan = await self._build_pool(name, config_name)
            rt.install(pool, plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes the endpoint's FailureReason
            reason = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, SdmakerError):
                logger.exception("endpoint %s failed to start", name)
            self._log(name, f"endpoint failed: {reason}")
            self._set_status(name, EndpointStatus.FAILED, failure_reason=reason[:2048])
            return
        finally:
            rt.task = None
        self._log(name, f"endpoint in service after {time.monotonic() - started:.1f} s")
        self._set_status(name, EndpointStatus.IN_SERVICE, failure_reason=None)

    # -- public operations (called by the control plane) -----------------------------------------

    def create(self, name: str, config_name: str) -> None:
        """Register the endpoint (``Creating``) and start its workers in the background."""
        self._variant(config_name)  # fail fast on a dangling config
        if not self.db.add_endpoint(name, config_name, EndpointStatus.CREATING):
            raise EndpointExistsError(f"endpoint {name} exists already", endpoint=name)
        self.scaling.store.forget_count(name)  # a new endpoint starts at its InitialInstanceCount
        self.db.delete("endpoint_stats", name)  # a save that raced the delete of an earlier endpoint of this name
        self._launch(name, config_name)

    def update(self, name: str, config_name: str) -> None:
        """Blue/green: start the new pool; swap when ready; the old pool drains then stops."""
        rec = self.require(name)
        rt = self.live.get(name)
        if rec.status is not EndpointStatus.IN_SERVICE or rt is None or rt.pool is None:
            raise EndpointNotReadyError(f"endpoint {name} is {rec.status}; only an InService endpoint can be "
                                        "updated", status=rec.status.value)
        self._variant(config_name)
        self.scaling.store.forget_count(name)  # the new config's InitialInstanceCount (within any target's bounds)
        self._set_status(name, EndpointStatus.UPDATING)
        rt.task = asyncio.create_task(self._swap(name, config_name, rt), name=f"update-{name}")

    async def _swap(self, name: str, config_name: str, rt: LiveEndpoint) -> None:
        try:
            new_pool, plan = await self._build_pool(name, config_name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed update keeps the old pool serving
            reason = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
            self._log(name, f"update failed, old workers keep serving: {reason}")
            self._set_status(name, EndpointStatus.IN_SERVICE,
                             failure_reason=f"UpdateEndpoint failed: {reason}"[:2048])
            rt.task = None
            return
        rt.timeout_s, rt.max_queue = self.settings.invocation_timeout_s, self.settings.max_queue
        old = rt.install(new_pool, plan)
        self._set_status(name, EndpointStatus.IN_SERVICE, config_name=config_name, failure_reason=None)
        rt.task = None
        self._log(name, "update done; draining the previous workers")
        if old is not None:
            await old.close(drain_s=rt.timeout_s)

    async def delete(self, name: str) -> None:
        self.require(name)
        await self.scaling.forget(name)
        self.db.delete("endpoints", name)
        self.db.delete("endpoint_stats", name)
        rt = self.live.pop(name, None)
        if rt is None:
            return
        if rt.task is not None:
            rt.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await rt.task
        if rt.pool is not None:
            await rt.pool.close()
        self._log(name, "endpoint deleted")

    def require(self, name: str) -> EndpointRecord:
        rec = self.db.endpoint(name)
        if rec is None:
            raise EndpointNotFoundError(f"endpoint {name} not found", endpoint=name)
        return rec

    # -- invocation (called by the runtime API) ----------------------------------------------------

    def live_for_invoke(self, name: str) -> LiveEndpoint:
        """The live endpoint if it can take a request now; raises the matching error otherwise.

        Reads memory only on the way to a worker (the manager keeps ``live`` in step with every create,
        update and delete); the stored record is read only to word an error.
        """
        rt = self.live.get(name)
        if rt is None or rt.pool is None or not rt.status.serving:
            status = rt.status if rt is not None else self.require(name).status
            raise EndpointNotReadyError(f"Endpoint {name} is not in service (status {status}).",
                                        endpoint=name, status=status.value)
        if rt.pending >= rt.capacity + rt.max_queue:
            raise QueueFullError(f"Endpoint {name} has {rt.queue_depth} queued request(s), the limit is "
                                 f"{rt.max_queue}; retry later", endpoint=name, retry_after=1)
        return rt

    async def invoke(self, rt: LiveEndpoint, body: bytes, headers: dict[str, str], *,
                     validated: bool = False, work: Work = OPAQUE_WORK, job_id: str | None = None,
                     on_chunk: ChunkCallback | None = None, timeout_s: float | None = None) -> WorkerReply:
        """Send one request to ``rt``'s workers, counting it; ``validated``: the body is canonical JSON the
        daemon already validated (the worker skips its own validation). ``job_id``: the request's job in
        :attr:`events` (an asynchronous inference job's InferenceId), whose progress it reports;
        ``timeout_s``: this request's budget instead of the endpoint's (InvocationTimeoutSeconds).

        ``job_id``: the request's events go to :attr:`events` under that id: ``queued`` (position) now,
        ``started`` when a worker takes it, the worker's ``step``/``preview`` events while it runs, then ``done``
        (:func:`done_event`) or ``error``. ``on_chunk``: receives a streaming ``predict_fn``'s chunks as they come.

        Admission first (:class:`~._admission.Admission`): a request over the memory budget or too large for
        the timeout is a 400, one the work ahead of it would make late a 503 with ``Retry-After``, at once.
        """
        pool = rt.pool  # read the pool and enter it without awaiting in between (see WorkerPool.close)
        assert pool is not None
        multi_model = isinstance(pool, MultiModelPool)  # each target model has its own worker and queue
        if not pool.workers and not multi_model:  # scaled to zero (MinCapacity 0): a worker starts for this request
            self.scaling.wake(rt.name)
        timeout_s = rt.timeout_s if timeout_s is None else timeout_s
        if not multi_model:
            rt.admission.check(work, name=rt.name, timeout_s=timeout_s, workers=max(1, pool.ready_count),
                               free_slots=(pool.free_slots if pool.workers else pool.spec.slots) - pool.waiting,
                               budget_pixels=pool.budget_pixels,
                               share=BATCH_SIZE_GROUPS if pool.spec.max_batch > 0 else 1)
        rt.admission.taken(work)
        rt.pending += 1
        started = time.monotonic()
        service_s: float | None = None
        concurrency = 1.0
        on_event = None
        if job_id is not None:
            self.events.publish(job_id, "queued", {"position": pool.waiting, "endpoint": rt.name})
            events = self.events

            def on_event(type_: str, data: dict[str, Any]) -> None:
                events.publish(job_id, type_, data)

        try:
            reply = await pool.invoke(body, headers, timeout_s=timeout_s, validated=validated,
                                      pixels=work.pixels, job_id=job_id, on_event=on_event, on_chunk=on_chunk)
            if reply.status < 300:
                service_s, concurrency = reply.service_s, reply.concurrency
            else:
                rt.errors += 1
            if job_id is not None:
                self.events.publish(job_id, *done_event(reply))
        except SdmakerError as exc:
            rt.errors += 1
            if job_id is not None:
                self.events.publish(job_id, "error", {"status": exc.http_status, "code": exc.code,
                                                      "message": exc.message})
            raise
        except asyncio.CancelledError:
            if job_id is not None:
                self.events.publish(job_id, "error", {"status": 499, "code": "GenerationCancelledError",
                                                      "message": "the caller went away"})
            raise
        finally:
            rt.admission.done(work, service_s=service_s, concurrency=concurrency)
            rt.pending -= 1
            rt.invocations += 1
            rt.latencies.append(time.monotonic() - started)
            await asyncio.shield(self._stats_changed())  # the counts are on disk before the answer goes out
        return reply

    # -- instance counts and autoscaling: the seam each backend implements (local worker pools here) ------

    def _scaled_variant(self, endpoint: str, variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(production variant, model body) of ``endpoint`` when ``variant`` is the variant it serves."""
        rec = self.require(endpoint)
        body, model = self._variant(rec.config_name)
        served = str(body.get("VariantName", "AllTraffic"))
        if variant != served:
            raise InvalidRequestError(f"endpoint {endpoint} has no variant {variant!r}: sdmaker serves its first "
                                      f"variant, {served!r}", field="VariantName", value=variant)
        return body, model

    async def set_instance_count(self, endpoint: str, variant: str, count: int) -> None:
        """Run ``count`` instances of ``endpoint``'s ``variant`` from now on; returns once they serve.

        The count is stored first, so a restarted daemon brings the endpoint back at it. Local backend: the
        variant's pool grows (new workers take requests once ready) or shrinks (retired workers finish their
        in-flight requests first, up to the invocation timeout; none is dropped). An endpoint whose pool is
        still starting gets ``count`` when it is built. 0 is allowed: a request then waits while one starts.

        Raises:
            EndpointNotFoundError / InvalidRequestError: no such endpoint, or not the variant it serves.
            WorkerStartError: a new worker failed to start (the count stays what it was).
        """
        self._scaled_variant(endpoint, variant)
        self.scaling.store.set_count(endpoint, variant, count)
        rt = self.live.get(endpoint)
        if rt is None or rt.pool is None or rt.plan is None:
            return
        pool, plan = rt.pool, rt.plan
        workers = count * plan.workers_per_instance
        before = len(pool.workers)
        if workers == before:
            return
        self._log(endpoint, f"scaling from {before // plan.workers_per_instance} to {count} instance(s)")
        # while old and new workers run side by side, each gets the smaller (larger count's) memory budget
        pool.budget_pixels = await asyncio.to_thread(memory_budget_for, plan, max(workers, before))
        try:
            await pool.resize(workers, drain_s=rt.timeout_s)
        except BaseException:
            self.scaling.store.set_count(endpoint, variant, len(pool.workers) // plan.workers_per_instance)
            raise
        finally:
            pool.budget_pixels = await asyncio.to_thread(memory_budget_for, plan, len(pool.workers))
        self._log(endpoint, f"now {count} instance(s)")

    async def apply_scaling(self, endpoint: str, variant: str, target: ScalingTarget | None) -> bool:
        """Check ``target`` (``None``: deregistered) against what this backend can hold, and take it.

        Returns whether the backend scales natively: a pool with an ``apply_autoscaling(config)`` method (the
        Ray backend) gets :meth:`ScalingTarget.ray_autoscaling_config` (with the endpoint's median latency as
        the time per request) and Serve scales it; the local pool returns ``False``: sdmaker's own
        target-tracking loop (:mod:`._autoscaler`) drives :meth:`set_instance_count`. The loop hands the
        target again to every new pool (daemon restart, UpdateEndpoint).

        Raises:
            InvalidRequestError: a ``MaxCapacity`` this machine's cores or memory cannot hold (field
                ``maxCapacity``), or not the variant the endpoint serves.
        """
        self._scaled_variant(endpoint, variant)
        rt = self.live.get(endpoint)
        # a pool that scales natively takes Serve's autoscaling_config (the Ray backend's RayPool)
        native = getattr(rt.pool, "apply_autoscaling", None) if rt is not None and rt.pool is not None else None
        if native is not None and rt is not None:
            await native(None if target is None else target.ray_autoscaling_config(rt.percentile(0.5)))
            return True
        if target is not None:
            await asyncio.to_thread(self.check_instance_count, endpoint, target.max_capacity, "maxCapacity")
        return False

    def check_instance_count(self, endpoint: str, count: int, field: str) -> None:
        """Refuse ``count`` instances of ``endpoint`` when this machine cannot hold that many workers: more than
        ``SDMAKER_MAX_INSTANCES`` processes (its cores), or more than its memory fits (``SDMAKER_MEMORY_MB``
        shared by workers that each need their runtime, the weights and one small image)."""
        rec = self.require(endpoint)
        _, model = self._variant(rec.config_name)
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        per_instance = str((container.get("Environment") or {}).get("SAGEMAKER_MODEL_SERVER_WORKERS") or "1")
        workers = count * max(1, int(per_instance) if per_instance.isdigit() else 1)
        shown = f"1 validation error detected: Value '{count}' at '{field}' failed to satisfy constraint:"
        if workers > self.settings.max_instances:
            raise InvalidRequestError(
                f"{shown} {count} instance(s) x SAGEMAKER_MODEL_SERVER_WORKERS ({per_instance}) worker processes "
                f"must be less than or equal to {self.settings.max_instances}, what this machine's cores may hold "
                "(SDMAKER_MAX_INSTANCES)", field=field, value=count, allowed=f"<= {self.settings.max_instances}")
        rt = self.live.get(endpoint)
        if rt is None or rt.plan is None:
            return  # the model is not resolved yet: its memory need is unknown
        floor = worker_memory_floor(rt.plan.config.model_dir, rt.plan.config.dtype)
        memory = self.settings.memory_bytes
        if workers * floor > memory:
            fits = memory // floor // max(1, workers // max(1, count))
            raise InvalidRequestError(
                f"{shown} {workers} worker(s) of model {rt.plan.model_name} need at least {floor / 2**20:.0f} MiB "
                f"each, and this endpoint's workers share {memory / 2**20:.0f} MiB (SDMAKER_MEMORY_MB): at most "
                f"{fits} instance(s) fit", field=field, value=count, allowed=f"<= {fits}")

    def instance_counts(self, endpoint: str) -> tuple[int, int]:
        """(current, desired) instances of ``endpoint``: serving now, and asked for (scaled or initial)."""
        rt = self.live.get(endpoint)
        per = rt.plan.workers_per_instance if rt is not None and rt.plan is not None else 1
        current = rt.pool.ready_count // per if rt is not None and rt.pool is not None else 0
        desired = self.scaling.store.count(endpoint)
        if desired is None:
            rec = self.require(endpoint)
            config = self.db.get("endpoint_configs", rec.config_name)
            variants = config.body["ProductionVariants"] if config is not None else [{}]
            desired = int(variants[0].get("InitialInstanceCount") or 1)
        return current, desired

    def update_instance_count(self, endpoint: str, variant: str, count: int) -> None:
        """``UpdateEndpointWeightsAndCapacities``: ``Updating`` while the count changes, then ``InService``."""
        rec = self.require(endpoint)
        rt = self.live.get(endpoint)
        if rec.status is not EndpointStatus.IN_SERVICE or rt is None or rt.pool is None:
            raise EndpointNotReadyError(f"endpoint {endpoint} is {rec.status}; only an InService endpoint can be "
                                        "updated", status=rec.status.value)
        self._scaled_variant(endpoint, variant)
        self._set_status(endpoint, EndpointStatus.UPDATING)

        async def run() -> None:
            try:
                await self.set_instance_count(endpoint, variant, count)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the old count keeps serving
                reason = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
                self._log(endpoint, f"instance count change failed: {reason}")
                self._set_status(endpoint, EndpointStatus.IN_SERVICE,
                                 failure_reason=f"UpdateEndpointWeightsAndCapacities failed: {reason}"[:2048])
            else:
                self._set_status(endpoint, EndpointStatus.IN_SERVICE, failure_reason=None)
            finally:
                rt.task = None

        rt.task = asyncio.create_task(run(), name=f"capacity-{endpoint}")

    # -- sdmaker's own view (CLI describe) ---------------------------------------------------------

    def details(self, name: str) -> dict[str, Any]:
        rec = self.require(name)
        rt = self.live.get(name)
        out: dict[str, Any] = {"name": name, "status": rec.status, "failure_reason": rec.failure_reason,
                               "config_name": rec.config_name, "model_digest": rec.model_digest,
                               "model_path": rec.model_path, "created": rec.created, "modified": rec.modified,
                               "log_file": str(self.log_file(name))}
        if rt is not None:
            out.update({"model_name": rt.model_name, "instance_type": rt.instance_type,
                        "timeout_s": rt.timeout_s, "max_queue": rt.max_queue, "queue_depth": rt.queue_depth,
                        "expected_wait_s": round(rt.expected_wait_s, 3), "in_flight": rt.pending,
                        "memory_budget_pixels": rt.budget_pixels,
                        "seconds_per_unit": rt.admission.s_per_unit,
                        "work_unit": "request" if not rt.default_handler else "megapixel-step",
                        "max_batch": rt.pool.spec.max_batch if rt.pool else None,
                        "invocations": rt.invocations, "errors": rt.errors, "default_handler": rt.default_handler,
                        "latency_p50_s": rt.percentile(0.50), "latency_p95_s": rt.percentile(0.95),
                        "workers": [w.describe() for w in rt.pool.workers] if rt.pool else []})
            if isinstance(rt.pool, MultiModelPool):
                out["multi_model"] = rt.pool.describe()
        return out
