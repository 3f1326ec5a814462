"""The Ray backend of an endpoint variant: one Ray Serve application whose replicas are the workers.

:class:`RayPool` answers what the endpoint manager asks of a local :class:`~sdmaker.serving.daemon._pool.WorkerPool`
(start, invoke, close, ready/free counts, ``workers`` for describe), but Ray places, restarts and scales
the replicas (:mod:`._replica`). Mapping:

* ``InitialInstanceCount`` (x ``SAGEMAKER_MODEL_SERVER_WORKERS``) -> ``num_replicas``; ``InstanceType`` ->
  ``ray_actor_options`` (:mod:`._resources`);
* a worker's request slots (1, or ``SDMAKER_MAX_BATCH`` with step batching) -> ``max_ongoing_requests``;
  the endpoint's queue bound -> ``max_queued_requests``; Serve's ``BackPressureError`` -> 503 with
  ``Retry-After``;
* autoscaling (:meth:`RayPool.set_autoscaling`) -> Serve's ``autoscaling_config`` (min/max replicas, target
  ongoing requests per replica, up/down-scale delays from the policy's cooldowns); a fixed count
  (:meth:`RayPool.set_desired_count`) -> ``num_replicas``;
* a replica (or its node) dying under a request -> ``ModelError`` 424, never a retry elsewhere and never a
  hang; Ray Serve's health check replaces the replica while the others keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from sdmaker.errors import (
    ERROR_CODE_HEADER,
    InvocationFailedError,
    InvocationTimeoutError,
    QueueFullError,
    WorkerStartError,
)
from sdmaker.serving._protocol import DEADLINE_HEADER, JOB_ID_HEADER, TIMEOUT_STATUS, VALIDATED_HEADER
from sdmaker.serving.daemon._pool import WorkerPool
from sdmaker.serving.daemon._worker_process import FORWARDED_HEADERS, WorkerReply
from sdmaker.serving.daemon.ray._resources import ReplicaResources

if TYPE_CHECKING:
    from sdmaker.serving.daemon._multi_model import MultiModelPool

__all__ = ["Pool", "PoolShape", "RayPool", "ReplicaView"]

logger = logging.getLogger(__name__)

#: How often the replicas' placement and health are read from the cluster.
_REFRESH_S = 2.0
#: Serve's health check of each replica (the worker process is alive).
_HEALTH_PERIOD_S = 2.0
_HEALTH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PoolShape:
    """The part of a worker spec the endpoint manager reads (batching width)."""

    max_batch: int

    @property
    def slots(self) -> int:
        return max(1, self.max_batch)


@dataclass
class ReplicaView:
    """One replica as ``endpoint describe`` shows it: where it runs, its health and what it served."""

    index: int
    replica: str
    node: str = ""
    pid: int | None = None
    state: str = "Starting"
    restarts: int = 0
    served: int = 0
    in_flight: int = 0
    model_source: str | None = None
    startup_seconds: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        return {"index": self.index, "state": self.state, "pid": self.pid, "port": None, "node": self.node,
                "replica": self.replica, "restarts": self.restarts, "error": self.error, "served": self.served,
                "in_flight": self.in_flight, "model_source": self.model_source,
                "startup_seconds": self.startup_seconds, "standby": False, "backend": "ray"}


class RayPool:
    """One endpoint variant as a Ray Serve application (see the module docstring)."""

    def __init__(self, *, app: str, spec: dict[str, Any], resources: ReplicaResources, count: int, max_batch: int,
                 max_queue: int, startup_timeout_s: float, on_change: Callable[[], None] | None = None) -> None:
        self.app = app
        self.replica_spec = spec
        self.resources = resources
        self.spec = PoolShape(max_batch)
        self.count = count
        self.autoscaling: dict[str, Any] | None = None
        self.max_queue = max_queue
        self.startup_timeout_s = startup_timeout_s
        self.budget_pixels: int | None = None
        self.in_flight = 0
        self._on_change = on_change
        self._handle: Any = None
        self._replicas: dict[str, ReplicaView] = {}
        self._running = 0
        self._refresh_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- deployment ------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "name": "variant", "ray_actor_options": self.resources.actor_options(),
            "max_ongoing_requests": self.spec.slots,
            # Serve wants -1 (no bound) or a positive bound; a queue of 0 is the daemon's own check already
            "max_queued_requests": max(1, self.max_queue),
            "health_check_period_s": _HEALTH_PERIOD_S, "health_check_timeout_s": _HEALTH_TIMEOUT_S,
            "graceful_shutdown_timeout_s": 5.0, "graceful_shutdown_wait_loop_s": 0.5}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling
            opts["num_replicas"] = "auto"
        else:
            opts["num_replicas"] = self.count
        return opts

    def _code_version(self) -> str:
        """A version that changes only when what a replica is built from changes (its spec, its resources).

        Serve gives a deployment deployed from Python without a version a random one on every ``serve.run``, and a
        new version replaces every replica. Scaling calls (a policy registered, a desired count) redeploy with
        another ``num_replicas`` or ``autoscaling_config`` only; with a stable version Serve applies those in
        place, so replicas serving requests are not restarted (on a loaded machine a restart took ~50 s, and
        requests queued behind it timed out).
        """
        shape = {"spec": self.replica_spec, "actor": self.resources.actor_options()}
        return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _deploy(self) -> None:
        from ray import serve

        from sdmaker.serving.daemon.ray._replica import Replica

        # ``version`` is refused from user code since Serve 2.x manages it; ``_internal`` is how Serve's own
        # builders pass one (see :meth:`_code_version` for why a stable one matters)
        base: Any = serve.deployment(Replica)
        deployment: Any = base.options(version=self._code_version(), _internal=True)
        app = deployment.options(**self._options()).bind(self.replica_spec)
        serve._run(app, name=self.app, route_prefix=None, _blocking=False)  # waited for by _wait_running

    def _app_status(self) -> tuple[str, str]:
        """(application status, the deployment's message) from Serve."""
        from ray import serve

        status = serve.status().applications.get(self.app)
        if status is None:
            return "NOT_STARTED", ""
        messages = [d.message for d in status.deployments.values() if d.message]
        return str(status.status.value if hasattr(status.status, "value") else status.status), \
            " ".join(messages) or status.message

    async def _wait_running(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            state, message = await asyncio.to_thread(self._app_status)
            if state == "RUNNING":
                return
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise WorkerStartError(_failure(message) or f"the Ray Serve application {self.app} failed to deploy")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"the replicas were not ready within {self.startup_timeout_s:.0f} s "
                                       f"(ContainerStartupHealthCheckTimeoutInSeconds): {_failure(message)}")
            await asyncio.sleep(0.5)

    async def start(self) -> None:
        """Deploy the application and wait until its replicas serve; on failure remove it and raise."""
        try:
            await asyncio.to_thread(self._deploy)
            await self._wait_running()
            from ray import serve

            self._handle = await asyncio.to_thread(serve.get_app_handle, self.app)
        except BaseException:
            await self._delete()
            raise
        await self._refresh()
        self._refresh_task = asyncio.create_task(self._refresh_forever(), name=f"ray-refresh-{self.app}")

    async def _delete(self) -> None:
        from ray import serve

        with contextlib.suppress(Exception):
            await asyncio.to_thread(serve.delete, self.app)

    async def close(self, *, drain_s: float = 0.0) -> None:
        """Delete the application (its replicas stop); with ``drain_s`` first let in-flight requests finish."""
        self._closing = True
        deadline = time.monotonic() + drain_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self._handle is not None:  # its router's background tasks would outlive the driver otherwise
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._handle.shutdown_async(), 10.0)
        await self._delete()

    # -- scaling (the autoscaling API's seam) ---------------------------------------------------------

    async def set_desired_count(self, count: int) -> None:
        """Run exactly ``count`` replicas (autoscaling off): Serve's ``num_replicas``."""
        self.count, self.autoscaling = max(0, int(count)), None
        await asyncio.to_thread(self._deploy)

    async def set_autoscaling(self, min_count: int, max_count: int, target_ongoing: float, *,
                              scale_out_cooldown_s: float | None = None,
                              scale_in_cooldown_s: float | None = None) -> None:
        """Let Serve scale between ``min_count`` and ``max_count`` replicas, aiming at ``target_ongoing``
        requests in flight per replica; the cooldowns become Serve's upscale / downscale delays.
        ``min_count`` 0 is allowed: a request arriving at zero replicas waits while one starts."""
        config: dict[str, Any] = {"min_replicas": int(min_count), "max_replicas": int(max_count),
                                  "target_ongoing_requests": float(target_ongoing),
                                  "initial_replicas": max(int(min_count), min(self.count, int(max_count)))}
        if scale_out_cooldown_s is not None:
            config["upscale_delay_s"] = float(scale_out_cooldown_s)
        if scale_in_cooldown_s is not None:
            config["downscale_delay_s"] = float(scale_in_cooldown_s)
            if min_count == 0:
                config["downscale_to_zero_delay_s"] = float(scale_in_cooldown_s)
        self.autoscaling = config
        await asyncio.to_thread(self._deploy)

    async def resize(self, count: int, *, drain_s: float = 0.0) -> None:
        """The local pool's resize, on Ray: ``count`` replicas; Serve drains the replicas it removes."""
        await self.set_desired_count(count)

    async def apply_autoscaling(self, config: Mapping[str, Any] | None) -> None:
        """Serve's ``autoscaling_config`` as given (e.g. ``ScalingTarget.ray_autoscaling_config()``); ``None``:
        back to a fixed count, the replicas running now."""
        if config is None:
            await self.set_desired_count(max(self._running, 1) if self.count else 0)
            return
        self.autoscaling = {**config, "initial_replicas": max(int(config.get("min_replicas", 1)),
                                                              min(max(self._running, 1),
                                                                  int(config.get("max_replicas", 1))))}
        await asyncio.to_thread(self._deploy)

    # -- replicas ----------------------------------------------------------------------------------

    def _actors(self) -> list[dict[str, Any]]:
        import ray._private.state as ray_state

        klass = f"ServeReplica:{self.app}:variant"
        return [a for a in ray_state.actors().values() if a.get("ActorClassName") == klass]

    async def _refresh(self) -> None:
        """Read the replicas' placement and state from the cluster (GCS actor table; no dashboard needed)."""
        try:
            actors = await asyncio.to_thread(self._actors)
        except Exception as exc:  # noqa: BLE001 - describe shows the last known state
            logger.debug("reading the replicas of %s failed: %s", self.app, exc)
            return
        before = {(v.replica, v.state) for v in self._replicas.values()}
        running = 0
        for actor in actors:
            rid = actor["ActorID"]
            view = self._replicas.get(rid)
            if view is None:
                view = self._replicas[rid] = ReplicaView(index=len(self._replicas), replica=rid)
            state = actor.get("State")
            view.node = actor.get("Address", {}).get("NodeID") or view.node
            view.pid = actor.get("Pid") or view.pid
            view.restarts = int(actor.get("NumRestarts") or 0)
            if state == "ALIVE":
                view.state = "Ready" if view.in_flight == 0 else "Busy"
                running += 1
            elif state == "DEAD":
                view.state = "Stopped"
                cause = actor.get("DeathCause")
                view.error = _death_text(cause) if cause else view.error
            else:
                view.state = "Starting" if state in ("DEPENDENCIES_UNREADY", "PENDING_CREATION") else "Restarting"
        # forget replicas long gone: keep the live ones and the last few dead ones
        dead = [k for k, v in self._replicas.items() if v.state == "Stopped"]
        for key in dead[:-4]:
            del self._replicas[key]
        self._running = running
        if before != {(v.replica, v.state) for v in self._replicas.values()} and self._on_change is not None:
            self._on_change()

    async def _refresh_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(_REFRESH_S)
            await self._refresh()

    @property
    def workers(self) -> list[ReplicaView]:
        """The replicas Serve runs now (starting, serving or restarting); replaced ones are left out."""
        return sorted((v for v in self._replicas.values() if v.state != "Stopped"), key=lambda v: v.index)

    @property
    def ready_count(self) -> int:
        return self._running

    @property
    def capacity(self) -> int:
        return max(1, self._running) * self.spec.slots

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.in_flight)

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.capacity)

    # -- dispatch ----------------------------------------------------------------------------------

    async def invoke(self, body: bytes, headers: Mapping[str, str], *, timeout_s: float,
                     validated: bool = False, pixels: int = 0, job_id: str | None = None,
                     on_event: Any = None, on_chunk: Any = None) -> WorkerReply:
        """Send one invocation to a replica chosen by Ray Serve and return its reply (any status).

        Progress on Ray is coarse: ``on_event`` gets ``started`` when the request is handed to Serve, and the
        answer comes whole (a streaming ``predict_fn``'s chunks are joined into the body; ``on_chunk`` is not
        called). ``job_id`` reaches the worker as its header all the same.

        Raises:
            QueueFullError: Serve's queue for this application is full (``max_queued_requests``).
            InvocationTimeoutError: no reply within ``timeout_s``; the request is cancelled.
            InvocationFailedError: the replica (or its node) died while serving it (424).
        """
        import ray.exceptions as ray_errors
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        deadline = time.monotonic() + timeout_s
        fwd = {k: v for k, v in headers.items() if k.lower() in FORWARDED_HEADERS}
        if validated:
            fwd[VALIDATED_HEADER] = "1"
        fwd[DEADLINE_HEADER] = f"{timeout_s:.3f}"
        if job_id is not None:
            fwd[JOB_ID_HEADER] = job_id
        if on_event is not None:
            on_event("started", {"worker": "ray"})
        self.in_flight += 1
        started = time.monotonic()
        try:
            response: Any = None
            try:
                response = self._handle.invoke.remote(body, fwd, timeout_s)
                out = await asyncio.wait_for(_result(response), timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                if response is not None:
                    response.cancel()
                raise InvocationTimeoutError(f"invocation timed out after {timeout_s:g} s",
                                             timeout_s=timeout_s) from None
            except BackPressureError:
                raise QueueFullError(f"the endpoint's replicas have {self.max_queue} queued request(s), the limit; "
                                     "retry later", retry_after=1) from None
            except RequestCancelledError:
                raise InvocationTimeoutError(f"invocation timed out after {timeout_s:g} s",
                                             timeout_s=timeout_s) from None
            except (ray_errors.RayActorError, ray_errors.ActorUnavailableError) as exc:
                self._changed_soon()
                raise InvocationFailedError(f"the replica serving this request died ({type(exc).__name__}); "
                                            "Ray restarts it, the other replicas keep serving",
                                            original_status=500) from None
            except ray_errors.RayTaskError as exc:
                self._changed_soon()
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise InvocationFailedError(f"the replica failed the request: {cause}", original_status=500) from None
        finally:
            self.in_flight -= 1
        view = self._note(out)
        status, reply_headers = int(out["status"]), dict(out["headers"])
        if status == TIMEOUT_STATUS and reply_headers.get(ERROR_CODE_HEADER) == "InvocationTimeoutError":
            raise InvocationTimeoutError(f"invocation timed out after {timeout_s:g} s; the worker stopped it at a "
                                         "step boundary", timeout_s=timeout_s)
        return WorkerReply(status=status, headers=reply_headers, body=bytes(out["body"]), worker=view.index,
                           service_s=float(out.get("service_s") or (time.monotonic() - started)), concurrency=1.0)

    def _note(self, out: Mapping[str, Any]) -> ReplicaView:
        rid = str(out.get("replica"))
        view = self._replicas.get(rid)
        if view is None:
            view = self._replicas[rid] = ReplicaView(index=len(self._replicas), replica=rid, state="Ready")
        view.served += 1
        view.node = str(out.get("node") or view.node)
        view.model_source = out.get("model_source") or view.model_source
        view.startup_seconds = out.get("startup_seconds") or view.startup_seconds
        return view

    def _changed_soon(self) -> None:
        task = asyncio.ensure_future(self._refresh())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)


async def _result(response: Any) -> Any:
    return await response


def _failure(message: str) -> str:
    """The useful end of a Serve deployment message (the replica constructor's own error)."""
    text = (message or "").strip()
    if "Traceback" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("RuntimeError", "ModelError", "ModelNotFoundError", "ConfigError",
                                                       "WorkerStartError", "RequirementsError", "OSError"))
                  or "Error:" in ln]
        if errors:
            return errors[-1][:2000]
        return lines[-1][:2000]
    return text[:2000]


def _death_text(cause: Any) -> str:
    text = str(cause)
    for line in text.splitlines():
        if "error_message" in line:
            return line.split(":", 1)[1].strip().strip('"')[:300]
    return text.strip().splitlines()[0][:300] if text.strip() else "died"


#: What an endpoint runs on: local worker processes or a Ray Serve application (the backend seam).
Pool: TypeAlias = "WorkerPool | RayPool | MultiModelPool"
