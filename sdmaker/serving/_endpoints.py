"""The endpoint manager: SageMaker's model -> endpoint config -> endpoint, run as local worker pools.

Life of an endpoint (``EndpointStatus``): ``Creating`` (model resolved, workers loading) -> ``InService``
or ``Failed`` (``FailureReason`` = the worker's own error); ``UpdateEndpoint`` -> ``Updating`` while the
new workers load next to the old ones (blue/green: the old pool serves until the new one is ready, then
drains) -> ``InService``; ``DeleteEndpoint`` -> gone. State lives in SQLite (:mod:`._state`), so a
restarted daemon brings its endpoints back (status ``Creating`` until their workers are ready again).

Instance types map to a local profile: ``ml.g*``/``ml.p*``/``ml.inf*``/``ml.trn*`` (accelerated) run with
``--device auto`` (CUDA when present, else CPU with a warning); every other type (``ml.m5.*``, ``ml.c5.*``,
``local``) runs on the CPU. ``InitialInstanceCount`` (times ``SAGEMAKER_MODEL_SERVER_WORKERS``, default 1)
is the number of worker processes; each gets ``cores / workers`` torch threads (``OMP_NUM_THREADS``, unless the
model's Environment or the daemon's environment sets it). Per-endpoint limits come from the model's ``Environment``:
``SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS`` (invocation timeout) and ``SDMAKER_MAX_QUEUE``.

Step batching: ``SDMAKER_MAX_BATCH`` in the model's Environment starts workers with ``--max-batch N``
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
    QueueFullError,
    SdmakerError,
)
from sdmaker.serving._logs import rotate_if_large
from sdmaker.serving._pool import WorkerPool
from sdmaker.serving._runtime import EndpointRuntime
from sdmaker.serving._standby import StandbyPool
from sdmaker.serving._state import EndpointRecord, EndpointStats, StateDB
from sdmaker.serving._variant import (
    DEFAULT_MAX_BATCH,
    FORBIDDEN_ENV,
    cpu_count,
    instance_profile,
    max_batch_for,
    model_ref,
    program_name,
    python_for,
    resolve_model_dir,
)
from sdmaker.serving._workers import WorkerReply, WorkerSpec

__all__ = ["DEFAULT_MAX_BATCH", "FORBIDDEN_ENV", "EndpointManager", "EndpointRuntime", "instance_profile"]

logger = logging.getLogger(__name__)

#: How often the daemon checks the size of endpoint logs and saves endpoint statistics.
_HOUSEKEEPING_EVERY_S = 5.0
#: Never handed to worker processes: they run the model's own code, which must not see the daemon's secrets.
_DAEMON_SECRETS = ("SDMAKER_SECRET_ACCESS_KEY", "SDMAKER_API_TOKEN", "SDMAKER_ACCESS_KEY_ID")


class EndpointManager:
    """Creates, updates, deletes and invokes endpoints. One per daemon (lives in the app's lifespan state)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.endpoints_dir
        self.db = StateDB(self.root / "state.sqlite3")
        self.runtimes: dict[str, EndpointRuntime] = {}
        self._generation = 0
        self.standbys = StandbyPool(count=settings.standby_workers, python=sys.executable,
                                    env=self._worker_env({}, 1), log_file=self.root / "standby.log")
        self._standby_task: asyncio.Task[None] | None = None
        self._rotate_task: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None

    # -- lifecycle of the manager ------------------------------------------------------------------

    async def start(self) -> None:
        """Bring back every endpoint that was serving (or starting) when the daemon last stopped."""
        for rec in self.db.endpoints():
            if rec.status in ("InService", "Creating", "Updating"):
                logger.info("restoring endpoint %s", rec.name)
                self.db.set_endpoint(rec.name, status="Creating", failure_reason=None)
                self._launch(rec.name, rec.config_name, restore=True)
        restoring = [rt.task for rt in self.runtimes.values() if rt.task is not None]
        self._standby_task = asyncio.create_task(self._start_standbys(restoring), name="standby-start")
        if self.settings.log_max_bytes > 0:
            self._rotate_task = asyncio.create_task(self._rotate_logs(), name="log-rotation")
        self._stats_task = asyncio.create_task(self._save_stats_periodically(), name="stats")

    async def _save_stats_periodically(self) -> None:
        """Request counts and latencies survive a restart (``endpoint describe``): saved every few seconds
        off the event loop, only for endpoints that served requests since; a SIGKILL loses at most that."""
        while True:
            await asyncio.sleep(_HOUSEKEEPING_EVERY_S)
            changed = self._unsaved_stats()
            if changed:
                await asyncio.to_thread(self._save_stats, changed)

    def _unsaved_stats(self) -> list[tuple[str, EndpointStats]]:
        """Stats of the endpoints that served requests since their last save, marked as saved."""
        out = []
        for name, rt in self.runtimes.items():
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
            for path in [self.root / "standby.log", *(self.log_file(name) for name in self.runtimes)]:
                await asyncio.to_thread(rotate_if_large, path, self.settings.log_max_bytes)

    async def _start_standbys(self, restoring: list[asyncio.Task[None]]) -> None:
        """Start the standbys once restored endpoints loaded (their imports would slow those loads down)."""
        await asyncio.gather(*restoring, return_exceptions=True)
        self.standbys.start()

    async def close(self) -> None:
        """Stop every worker; the database keeps the endpoints for the next start."""
        for background in (self._standby_task, self._rotate_task, self._stats_task):
            if background is not None:
                background.cancel()
        self._save_stats(self._unsaved_stats())
        await self.standbys.close()
        tasks = [rt.task for rt in self.runtimes.values() if rt.task is not None]
        for task in tasks:
            task.cancel()  # a pool still starting stops its own workers when cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(rt.pool.close() for rt in self.runtimes.values() if rt.pool),
                             return_exceptions=True)
        self.runtimes.clear()
        self.db.close()

    # -- helpers -----------------------------------------------------------------------------------

    def log_file(self, name: str) -> Path:
        return self.root / name / "endpoint.log"

    def _log(self, name: str, text: str) -> None:
        path = self.log_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def _worker_env(self, model_env: dict[str, str], count: int) -> dict[str, str]:
        """A worker's environment: the daemon's (minus its secrets), the model's, and a torch thread count."""
        base_env = {k: v for k, v in self.settings.env.items() if k not in _DAEMON_SECRETS}
        worker_env = {**base_env, **{k: v for k, v in model_env.items() if k not in FORBIDDEN_ENV},
                      "SDMAKER_HOME": str(self.settings.home)}
        # N workers x all-cores torch threads oversubscribe the CPU: OpenMP threads then spin-wait on each
        # other (measured here: sd1-tiny 0.25 s/request with 1 thread, 1.6-13 s with 2 on 2 busy cores).
        # Split the cores between the workers unless the model or the user chose a thread count.
        threads = worker_env.get("OMP_NUM_THREADS") or str(max(1, cpu_count() // count))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            worker_env.setdefault(var, threads)
        return worker_env

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

    async def _build_pool(self, name: str, config_name: str, rt: EndpointRuntime) -> WorkerPool:
        """Resolve the model, prepare its environment, start its workers; returns a ready pool."""
        variant, model = self._variant(config_name)
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        env = {str(k): str(v) for k, v in (container.get("Environment") or {}).items()}
        ref = model_ref(container)
        self._log(name, f"resolving model data {ref}")
        model_dir, digest = await asyncio.to_thread(resolve_model_dir, ref, self.settings)
        python = await asyncio.to_thread(python_for, model_dir, self.settings)
        rt.default_handler = not (model_dir / "code" / program_name(env)).is_file()
        rt.instance_type = variant.get("InstanceType")
        rt.model_name = variant["ModelName"]
        if env.get("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"):
            rt.timeout_s = float(env["SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"])
        if env.get("SDMAKER_MAX_QUEUE"):
            rt.max_queue = int(env["SDMAKER_MAX_QUEUE"])
        per_instance = int(env.get("SAGEMAKER_MODEL_SERVER_WORKERS") or 1)
        count = max(1, int(variant.get("InitialInstanceCount") or 1)) * max(1, per_instance)
        startup = float(variant.get("ContainerStartupHealthCheckTimeoutInSeconds") or self.settings.startup_timeout_s)
        worker_env = self._worker_env(env, count)
        max_batch = max_batch_for(env, rt.default_handler)
        self._generation += 1
        device, warning = instance_profile(rt.instance_type)
        if warning:
            logger.warning("endpoint %s: %s", name, warning)
            self._log(name, f"warning: {warning}")
        spec = WorkerSpec(model_dir=model_dir, python=python, run_dir=self.root / name / "run",
                          log_file=self.log_file(name), env=worker_env, max_body_bytes=self.settings.max_body_bytes,
                          device=device, startup_timeout_s=startup, max_batch=max_batch)
        pool = WorkerPool(spec, count, tag=f"v{self._generation}", standbys=self.standbys)
        batching = f", step batching up to {max_batch} requests per worker" if max_batch else ""
        self._log(name, f"starting {count} worker(s) for model {rt.model_name} ({model_dir}){batching}")
        await pool.start()
        self.db.set_endpoint(name, model_digest=digest, model_path=str(model_dir))
        return pool

    def _launch(self, name: str, config_name: str, *, restore: bool = False) -> EndpointRuntime:
        rt = EndpointRuntime(name=name, timeout_s=self.settings.invocation_timeout_s,
                             max_queue=self.settings.max_queue)
        saved = self.db.stats(name) if restore else None
        if saved is not None:  # a daemon restart: the endpoint keeps its counts and recent latencies
            rt.restore_stats(saved)
        self.runtimes[name] = rt
        rt.task = asyncio.create_task(self._bring_up(name, config_name, rt), name=f"create-{name}")
        return rt

    async def _bring_up(self, name: str, config_name: str, rt: EndpointRuntime) -> None:
        started = time.monotonic()
        try:
            rt.pool = await self._build_pool(name, config_name, rt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes the endpoint's FailureReason
            reason = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, SdmakerError):
                logger.exception("endpoint %s failed to start", name)
            self._log(name, f"endpoint failed: {reason}")
            self.db.set_endpoint(name, status="Failed", failure_reason=reason[:2048])
            return
        finally:
            rt.task = None
        self._log(name, f"endpoint in service after {time.monotonic() - started:.1f} s")
        self.db.set_endpoint(name, status="InService", failure_reason=None)

    # -- public operations (called by the control plane) -----------------------------------------

    def create(self, name: str, config_name: str) -> None:
        """Register the endpoint (``Creating``) and start its workers in the background."""
        self._variant(config_name)  # fail fast on a dangling config
        if not self.db.add_endpoint(name, config_name, "Creating"):
            raise EndpointExistsError(f"endpoint {name} exists already", endpoint=name)
        self.db.delete("endpoint_stats", name)  # a save that raced the delete of an earlier endpoint of this name
        self._launch(name, config_name)

    def update(self, name: str, config_name: str) -> None:
        """Blue/green: start the new pool; swap when ready; the old pool drains then stops."""
        rec = self.require(name)
        rt = self.runtimes.get(name)
        if rec.status != "InService" or rt is None or rt.pool is None:
            raise EndpointNotReadyError(f"endpoint {name} is {rec.status}; only an InService endpoint can be "
                                        "updated", status=rec.status)
        self._variant(config_name)
        self.db.set_endpoint(name, status="Updating")
        rt.task = asyncio.create_task(self._swap(name, config_name, rt), name=f"update-{name}")

    async def _swap(self, name: str, config_name: str, rt: EndpointRuntime) -> None:
        staging = EndpointRuntime(name=name, timeout_s=self.settings.invocation_timeout_s,
                                  max_queue=self.settings.max_queue)
        try:
            new_pool = await self._build_pool(name, config_name, staging)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed update keeps the old pool serving
            reason = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
            self._log(name, f"update failed, old workers keep serving: {reason}")
            self.db.set_endpoint(name, status="InService", failure_reason=f"UpdateEndpoint failed: {reason}"[:2048])
            rt.task = None
            return
        old, rt.pool = rt.pool, new_pool
        rt.default_handler, rt.instance_type, rt.model_name = (staging.default_handler, staging.instance_type,
                                                               staging.model_name)
        rt.timeout_s, rt.max_queue = staging.timeout_s, staging.max_queue
        self.db.set_endpoint(name, status="InService", config_name=config_name, failure_reason=None)
        rt.task = None
        self._log(name, "update done; draining the previous workers")
        if old is not None:
            await old.close(drain_s=rt.timeout_s)

    async def delete(self, name: str) -> None:
        self.require(name)
        self.db.delete("endpoints", name)
        self.db.delete("endpoint_stats", name)
        rt = self.runtimes.pop(name, None)
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

    def runtime_for_invoke(self, name: str) -> EndpointRuntime:
        """The endpoint's runtime if it can take a request now; raises the matching error otherwise."""
        rec = self.require(name)
        rt = self.runtimes.get(name)
        if rt is None or rt.pool is None or rec.status not in ("InService", "Updating"):
            raise EndpointNotReadyError(f"Endpoint {name} is not in service (status {rec.status}).",
                                        endpoint=name, status=rec.status)
        if rt.pending >= rt.capacity + rt.max_queue:
            raise QueueFullError(f"Endpoint {name} has {rt.queue_depth} queued request(s), the limit is "
                                 f"{rt.max_queue}; retry later", endpoint=name, retry_after=1)
        return rt

    async def invoke(self, rt: EndpointRuntime, body: bytes, headers: dict[str, str]) -> WorkerReply:
        pool = rt.pool  # read the pool and enter it without awaiting in between (see WorkerPool.close)
        assert pool is not None
        rt.pending += 1
        started = time.monotonic()
        try:
            reply = await pool.invoke(body, headers, timeout_s=rt.timeout_s)
        except SdmakerError:
            rt.errors += 1
            raise
        finally:
            rt.pending -= 1
            rt.invocations += 1
            rt.latencies.append(time.monotonic() - started)
        if reply.status >= 300:
            rt.errors += 1
        return reply

    # -- sdmaker's own view (CLI describe) ---------------------------------------------------------

    def details(self, name: str) -> dict[str, Any]:
        rec = self.require(name)
        rt = self.runtimes.get(name)
        out: dict[str, Any] = {"name": name, "status": rec.status, "failure_reason": rec.failure_reason,
                               "config_name": rec.config_name, "model_digest": rec.model_digest,
                               "model_path": rec.model_path, "created": rec.created, "modified": rec.modified,
                               "log_file": str(self.log_file(name))}
        if rt is not None:
            out.update({"model_name": rt.model_name, "instance_type": rt.instance_type,
                        "timeout_s": rt.timeout_s, "max_queue": rt.max_queue, "queue_depth": rt.queue_depth,
                        "max_batch": rt.pool.spec.max_batch if rt.pool else None,
                        "invocations": rt.invocations, "errors": rt.errors, "default_handler": rt.default_handler,
                        "latency_p50_s": rt.percentile(0.50), "latency_p95_s": rt.percentile(0.95),
                        "workers": [w.describe() for w in rt.pool.workers] if rt.pool else []})
        return out
