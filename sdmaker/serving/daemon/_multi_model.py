"""Multi-model endpoints: ``CreateModel`` with ``PrimaryContainer.Mode: MultiModel`` and a ``ModelDataUrl`` prefix.

An endpoint on such a model serves every ``model.tar.gz`` under the prefix; ``InvokeEndpoint`` names one with
``TargetModel`` (header ``X-Amzn-SageMaker-Target-Model``): its path relative to the prefix, as on AWS. The
prefix is an ``s3://bucket/prefix/``, a local folder, or a store-name prefix (``TargetModel`` appended gives
a store name); targets resolve through :func:`~sdmaker.store.resolve_model`, so an S3 archive is downloaded
and extracted safely once and kept in the store (the disk cache AWS keeps on the instance).

Design: **one worker process per loaded target model**, a one-worker :class:`~._pool.WorkerPool` started on
the first request for it. The alternative, one worker hosting several models, would need a second model
registry inside the worker and would let one model's crash or leak take the others down; separate
processes reuse everything a variant's worker already does (restarts, deadlines, step batching, the warm
standby that makes a cold start load-only) and free a model's memory exactly, by ending its process.
The loaded models form an LRU cache bounded by memory: each costs what one worker of it needs at least
(:func:`~._admission.worker_memory_floor`: runtime + weights + a small image, the admission code's
estimate), and a model that does not fit evicts the least recently used ones (each drains its in-flight
requests first) until it does. The budget is ``SDMAKER_MME_MEMORY_MB`` (the model's Environment first, then
the daemon's; default ``SDMAKER_MEMORY_MB``), and the number of processes is capped by
``SDMAKER_MAX_INSTANCES``. ``MultiModelConfig.ModelCacheSetting: Disabled`` (CreateModel) unloads a model as
soon as its requests are answered, as AWS does for endpoints whose models are each invoked rarely.

While a model loads, requests for it wait up to ``SDMAKER_MME_LOAD_WAIT`` seconds (default 30), then get
``ModelNotReadyException`` (429) while the load goes on; a retry then finds it loaded. CloudWatch's MME
metrics are kept per endpoint (:class:`ModelCacheStats`) and exported on ``/metrics``: ModelCacheHit,
ModelLoadingWaitTime, ModelDownloadingTime, ModelLoadingTime, ModelUnloadingTime, LoadedModelCount.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdmaker.config import Settings, load_settings
from sdmaker.errors import (
    InvalidRequestError,
    InvocationFailedError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    S3Error,
    SdmakerError,
)
from sdmaker.serving.daemon._admission import worker_memory_floor
from sdmaker.serving.daemon._pool import ChunkCallback, EventCallback, WorkerPool
from sdmaker.serving.daemon._standby import StandbyPool
from sdmaker.serving.daemon._variant import plan_variant, python_for, resolve_model_dir, worker_environment
from sdmaker.serving.daemon._worker_process import Worker, WorkerReply, WorkerSpec

__all__ = ["MULTI_MODEL", "TARGET_MODEL_HEADER", "ModelCacheStats", "MultiModelPool", "is_multi_model",
           "check_target_model"]

logger = logging.getLogger(__name__)

#: ``ContainerDefinition.Mode`` of a multi-model container.
MULTI_MODEL = "MultiModel"
#: The request header InvokeEndpoint's ``TargetModel`` travels in (lower case, as the app sees headers).
TARGET_MODEL_HEADER = "x-amzn-sagemaker-target-model"
#: botocore's ``TargetModelHeader`` pattern and length (runtime model): printable ASCII, 1-1024.
_TARGET_PATTERN = re.compile(r"\A[ -~]{1,1024}\Z")


def is_multi_model(container: Mapping[str, Any] | None) -> bool:
    return isinstance(container, Mapping) and container.get("Mode") == MULTI_MODEL


def check_target_model(target: str | None, endpoint: str) -> str:
    """``target`` as a safe relative path under the prefix; raises InvalidRequestError (400) otherwise.

    Refused: missing or empty, non-printable, absolute, ``..`` anywhere, backslashes and ``//`` (which could
    name another key or escape a local prefix folder).
    """
    if target is None or target == "":
        raise InvalidRequestError(f"Endpoint {endpoint} is a multi-model endpoint: InvokeEndpoint needs TargetModel "
                                  "(header X-Amzn-SageMaker-Target-Model), the path of a model.tar.gz relative to "
                                  "the model's ModelDataUrl prefix", field="TargetModel")
    shown = target[:200]
    if not _TARGET_PATTERN.match(target):
        raise InvalidRequestError(f"TargetModel {shown!r} must be 1 to 1024 printable ASCII characters",
                                  field="TargetModel", value=shown)
    parts = target.split("/")
    if target.startswith("/") or "\\" in target or any(p in ("..", ".", "") for p in parts):
        raise InvalidRequestError(f"TargetModel {shown!r} must be a relative path under the model prefix (no leading "
                                  "'/', no '.' or '..' segments, no '//' or backslashes)", field="TargetModel",
                                  value=shown)
    return target


@dataclass
class ModelCacheStats:
    """One endpoint's CloudWatch MME metrics as running (count, sum) pairs, read at scrape time."""

    hits: int = 0
    misses: int = 0
    #: metric -> [samples, seconds]
    times: dict[str, list[float]] = field(default_factory=lambda: {
        "ModelLoadingWaitTime": [0, 0.0], "ModelDownloadingTime": [0, 0.0], "ModelLoadingTime": [0, 0.0],
        "ModelUnloadingTime": [0, 0.0]})
    loaded: int = 0

    def observe(self, metric: str, seconds: float) -> None:
        entry = self.times[metric]
        entry[0] += 1
        entry[1] += seconds

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ModelCacheHit": {"hits": self.hits, "misses": self.misses},
                               "LoadedModelCount": self.loaded}
        for name, (count, total) in self.times.items():
            out[name] = {"samples": int(count), "sum_s": round(total, 4),
                         "average_s": round(total / count, 4) if count else None}
        return out


@dataclass
class _Loaded:
    """One target model in the cache: loading (``task`` running) or loaded (``pool`` serving)."""

    target: str
    task: asyncio.Task[None] | None = None
    pool: WorkerPool | None = None
    memory_bytes: int = 0
    model_dir: Path | None = None
    error: SdmakerError | None = None
    loaded_at: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    hits: int = 0
    in_flight: int = 0

    def describe(self) -> dict[str, Any]:
        state = "Loaded" if self.pool is not None else "Failed" if self.error is not None else "Loading"
        return {"target_model": self.target, "state": state, "memory_mib": round(self.memory_bytes / 2**20, 1),
                "model_dir": str(self.model_dir) if self.model_dir else None, "hits": self.hits,
                "in_flight": self.in_flight, "idle_s": round(time.monotonic() - self.last_used, 1),
                "error": self.error.message if self.error else None,
                "workers": [w.describe() for w in self.pool.workers] if self.pool else []}


@dataclass(frozen=True)
class _Shape:
    """What the endpoint manager reads of a pool's spec (one request slot: see :meth:`MultiModelPool.spec`)."""

    max_batch: int = 0

    @property
    def slots(self) -> int:
        return max(1, self.max_batch)


class MultiModelPool:
    """The workers of a multi-model endpoint: one :class:`WorkerPool` per loaded target model, LRU-bounded.

    Answers what the endpoint manager asks of a variant's pool (``invoke``, ``close``, worker counts);
    ``invoke`` reads the target from the request headers.
    """

    def __init__(self, *, endpoint: str, prefix: str, variant: Mapping[str, Any], model: Mapping[str, Any],
                 settings: Settings, run_dir: Path, log: Callable[[str], None], log_file: Path,
                 standbys: StandbyPool | None = None) -> None:
        self.endpoint = endpoint
        self.prefix = prefix
        self.variant, self.model = variant, model
        self.settings = settings
        self.run_dir = run_dir
        self._log = log
        self._log_file = log_file
        self._standbys = standbys
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        env = {str(k): str(v) for k, v in (container.get("Environment") or {}).items()}
        effective = load_settings(worker_environment(settings, env, 1))  # the model's Environment first
        self.memory_budget = effective.mme_memory_bytes or effective.memory_bytes
        self.load_wait_s = effective.mme_load_wait_s
        # the endpoint's limits from the model's Environment, as for a single model (._variant.plan_variant)
        timeout, queue = env.get("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"), env.get("SDMAKER_MAX_QUEUE")
        self.timeout_s: float | None = float(timeout) if timeout else None
        self.max_queue: int | None = int(queue) if queue else None
        self.max_models = max(1, settings.max_instances)
        #: ``MultiModelConfig.ModelCacheSetting: Disabled``: a model is unloaded once its requests are answered
        self.cache_models = (container.get("MultiModelConfig") or {}).get("ModelCacheSetting") != "Disabled"
        self._unloading: set[asyncio.Task[None]] = set()
        self.model_name = str(variant.get("ModelName"))
        self.instance_type = variant.get("InstanceType")
        self.spec = _Shape()
        self.budget_pixels: int | None = None
        self.stats = ModelCacheStats()
        self._models: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()  # least recent first
        self._room = asyncio.Lock()  # one eviction decision at a time
        self._generation = 0
        self._closing = False
        self.in_flight = 0

    # -- what the endpoint manager reads ---------------------------------------------------------------

    async def start(self) -> None:
        """Nothing loads before its first request (as on AWS): the endpoint is InService at once."""

    @property
    def workers(self) -> list[Worker]:
        return [w for m in self._models.values() if m.pool is not None for w in m.pool.workers]

    @property
    def ready_count(self) -> int:
        return sum(m.pool.ready_count for m in self._models.values() if m.pool is not None)

    @property
    def capacity(self) -> int:
        return sum(m.pool.capacity for m in self._models.values() if m.pool is not None)

    @property
    def free_slots(self) -> int:
        return sum(m.pool.free_slots for m in self._models.values() if m.pool is not None)

    @property
    def waiting(self) -> int:
        return sum(m.pool.waiting for m in self._models.values() if m.pool is not None)

    @property
    def loaded_count(self) -> int:
        return sum(1 for m in self._models.values() if m.pool is not None)

    @property
    def used_bytes(self) -> int:
        return sum(m.memory_bytes for m in self._models.values() if m.error is None)

    def describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "memory_budget_mib": round(self.memory_budget / 2**20, 1),
                "memory_used_mib": round(self.used_bytes / 2**20, 1), "load_wait_s": self.load_wait_s,
                "models": [m.describe() for m in reversed(self._models.values())],  # most recent first
                "metrics": self.stats.describe()}

    async def resize(self, count: int, *, drain_s: float = 0.0) -> None:
        """Instance counts do not apply: each target model has one worker while it is loaded."""

    async def close(self, *, drain_s: float = 0.0) -> None:
        self._closing = True
        for task in list(self._unloading):
            task.cancel()
        entries = list(self._models.values())
        self._models.clear()
        for entry in entries:
            if entry.task is not None:
                entry.task.cancel()
        await asyncio.gather(*(e.task for e in entries if e.task is not None), return_exceptions=True)
        await asyncio.gather(*(e.pool.close(drain_s=drain_s) for e in entries if e.pool is not None),
                             return_exceptions=True)
        self.stats.loaded = 0

    # -- invocation ----------------------------------------------------------------------------------

    async def invoke(self, body: bytes, headers: Mapping[str, str], *, timeout_s: float, validated: bool = False,
                     pixels: int = 0, job_id: str | None = None, on_event: EventCallback | None = None,
                     on_chunk: ChunkCallback | None = None) -> WorkerReply:
        """Send the request to its target model's worker, loading the model first when it is not loaded.

        Raises:
            InvalidRequestError: no or a malformed TargetModel, none such under the prefix, or a model larger
                than the whole memory budget.
            ModelNotReadyError: the model is still loading after the load wait (429; the load goes on).
            QueueFullError: every loaded model is busy, so none can be evicted to make room (503).
            InvocationFailedError: the model failed to load (424 ModelError).
        """
        lowered = {k.lower(): v for k, v in headers.items()}
        target = check_target_model(lowered.get(TARGET_MODEL_HEADER), self.endpoint)
        self.in_flight += 1
        try:
            entry = await self._loaded(target)
            entry.in_flight += 1
            try:
                assert entry.pool is not None
                return await entry.pool.invoke(body, headers, timeout_s=timeout_s, validated=validated, pixels=pixels,
                                               job_id=job_id, on_event=on_event, on_chunk=on_chunk)
            finally:
                entry.in_flight -= 1
                entry.last_used = time.monotonic()
                if not self.cache_models and entry.in_flight == 0 and entry.pool is not None:
                    self._unload_soon(entry)
        finally:
            self.in_flight -= 1

    async def _loaded(self, target: str) -> _Loaded:
        """The loaded entry of ``target`` (counted as a hit), else start or join its load and wait for it."""
        entry = self._models.get(target)
        if entry is not None and entry.pool is None and entry.task is None:
            del self._models[target]  # a failed load is retried by the next request
            entry = None
        if entry is not None and entry.pool is not None:
            self._models.move_to_end(target)
            entry.hits += 1
            entry.last_used = time.monotonic()
            self.stats.hits += 1
            return entry
        self.stats.misses += 1
        if entry is None:
            entry = _Loaded(target=target)
            self._models[target] = entry
            entry.task = asyncio.create_task(self._load(entry), name=f"mme-load-{self.endpoint}-{target}")
        assert entry.task is not None
        waited_from = time.monotonic()
        done, _ = await asyncio.wait({entry.task}, timeout=self.load_wait_s)
        self.stats.observe("ModelLoadingWaitTime", time.monotonic() - waited_from)
        if not done:
            raise ModelNotReadyError(f"Model {target} is still loading on endpoint {self.endpoint} (waited "
                                     f"{self.load_wait_s:g} s, SDMAKER_MME_LOAD_WAIT); retry shortly.",
                                     target_model=target)
        if entry.error is not None:
            raise entry.error
        if entry.pool is None:  # evicted again before this request got to it, or the pool closed
            raise ModelNotReadyError(f"Model {target} was unloaded while this request waited; retry.",
                                     target_model=target)
        self._models.move_to_end(target)
        entry.last_used = time.monotonic()
        return entry

    def _ref(self, target: str) -> str:
        if self.prefix.startswith("s3://"):
            return self.prefix.rstrip("/") + "/" + target
        folder = Path(self.prefix).expanduser()
        if folder.is_dir():
            return str(folder / target)
        return self.prefix + target  # a store-name prefix

    def _not_found(self, target: str, exc: SdmakerError) -> InvalidRequestError:
        ref = self._ref(target)
        if ref.startswith("s3://"):
            bucket, _, key = ref[len("s3://"):].partition("/")
            where = f"bucket: {bucket}, key: {key}"
        else:
            where = f"path: {ref}"
        return InvalidRequestError(f"Failed to download model data({where}). Please ensure that there is an object "
                                   f"located at the URL and that the role passed to CreateModel has permissions to "
                                   f"download the model. ({exc.message})", field="TargetModel", value=target)

    async def _load(self, entry: _Loaded) -> None:
        """Download (into the store), make room, start the model's worker; errors end up in ``entry.error``."""
        target = entry.target
        try:
            started = time.monotonic()
            try:
                model_dir, digest, name = await asyncio.to_thread(resolve_model_dir, self._ref(target), self.settings)
            except (ModelNotFoundError, S3Error) as exc:
                raise self._not_found(target, exc) from None
            self.stats.observe("ModelDownloadingTime", time.monotonic() - started)
            python = await asyncio.to_thread(python_for, model_dir, self.settings)
            variant = {**self.variant, "InitialInstanceCount": 1}
            plan = plan_variant(variant, self.model, model_dir=model_dir, digest=digest, display_name=name,
                                log_file=self._log_file, settings=self.settings)
            need = await asyncio.to_thread(worker_memory_floor, model_dir, plan.config.dtype)
            entry.model_dir = model_dir
            if need > self.memory_budget:
                raise InvalidRequestError(
                    f"TargetModel {target} needs about {need / 2**20:.0f} MiB loaded, more than this multi-model "
                    f"endpoint's whole budget of {self.memory_budget / 2**20:.0f} MiB (SDMAKER_MME_MEMORY_MB)",
                    field="TargetModel", value=target)
            async with self._room:
                await self._make_room(entry, need)
                entry.memory_bytes = need  # reserved while loading
            self._generation += 1
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", target)[:80]
            spec = WorkerSpec(config=plan.config, python=python, run_dir=self.run_dir / f"{safe}-{self._generation}",
                              startup_timeout_s=plan.startup_timeout_s)
            pool = WorkerPool(spec, 1, tag=f"mme-{self._generation}", standbys=self._standbys)
            pool.budget_pixels = plan.memory_budget_pixels
            self._log(f"loading target model {target} ({model_dir}, about {need / 2**20:.0f} MiB; "
                      f"{self.loaded_count} other(s) loaded)")
            loading = time.monotonic()
            try:
                await pool.start()
            except SdmakerError as exc:
                raise InvocationFailedError(f"Failed to load model {target}: {exc.message}",
                                            original_status=500) from None
            if self._closing or self._models.get(target) is not entry:
                await pool.close()
                return
            entry.pool, entry.loaded_at = pool, time.monotonic()
            self.stats.observe("ModelLoadingTime", entry.loaded_at - loading)
            self.stats.loaded = self.loaded_count
            self._log(f"target model {target} loaded in {entry.loaded_at - started:.2f} s "
                      f"(download {loading - started:.2f} s)")
        except asyncio.CancelledError:
            entry.error = InvocationFailedError(f"loading model {target} was cancelled", original_status=500)
            raise
        except SdmakerError as exc:
            entry.error = exc
            entry.memory_bytes = 0
            self._log(f"target model {target} failed to load: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - a load failure is the request's answer, never the daemon's
            logger.exception("endpoint %s: loading %s failed", self.endpoint, target)
            entry.error = InvocationFailedError(f"Failed to load model {target}: {type(exc).__name__}: {exc}",
                                                original_status=500)
            entry.memory_bytes = 0
        finally:
            entry.task = None

    async def _make_room(self, entry: _Loaded, need: int) -> None:
        """Evict least recently used loaded models until ``need`` more bytes (and one more process) fit."""
        while True:
            used = self.used_bytes - entry.memory_bytes
            count = sum(1 for m in self._models.values() if m is not entry and (m.pool is not None or m.task))
            if used + need <= self.memory_budget and count < self.max_models:
                return
            victim = next((m for m in self._models.values() if m is not entry and m.pool is not None), None)
            if victim is None:  # the rest are loading: nothing can be evicted now
                raise QueueFullError(
                    f"multi-model endpoint {self.endpoint} cannot make room for {entry.target} ({need / 2**20:.0f} "
                    f"MiB): the other models are loading; retry later", endpoint=self.endpoint, retry_after=2)
            await self._unload(victim, reason=f"to make room for {entry.target}")

    def _unload_soon(self, entry: _Loaded) -> None:
        """Unload ``entry`` in the background (model caching disabled: the answer does not wait for it)."""
        async def unload() -> None:
            async with self._room:
                if entry.in_flight == 0 and self._models.get(entry.target) is entry:
                    await self._unload(entry, reason="after its request (ModelCacheSetting Disabled)")

        task = asyncio.create_task(unload(), name=f"mme-unload-{self.endpoint}-{entry.target}")
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    async def _unload(self, victim: _Loaded, *, reason: str) -> None:
        """Take ``victim`` out of the cache (new requests load it afresh) and stop its worker once its
        in-flight requests are answered (up to the invocation timeout)."""
        if self._models.get(victim.target) is victim:
            del self._models[victim.target]
        pool, victim.pool = victim.pool, None
        self.stats.loaded = self.loaded_count
        if pool is None:
            return
        started = time.monotonic()
        with contextlib.suppress(Exception):
            await pool.close(drain_s=self.settings.invocation_timeout_s)
        took = time.monotonic() - started
        self.stats.observe("ModelUnloadingTime", took)
        self._log(f"unloaded target model {victim.target} {reason} ({took:.2f} s)")
        logger.info("endpoint %s: unloaded %s %s", self.endpoint, victim.target, reason)
