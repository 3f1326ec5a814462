"""One worker process as the daemon sees it: spawn, health-check, state, stop.

Each worker is ``python -m sdmaker.serving.container`` (the SageMaker container contract: ``GET /ping``,
``POST /invocations``) on a free loopback port. It loads the model once and answers one request at a
time, so a :class:`~._pool.WorkerPool` hands each request to an idle worker and concurrency equals the worker
count (SageMaker: ``InitialInstanceCount``). With step batching (``WorkerSpec.max_batch`` > 1) a worker
takes up to ``max_batch`` requests at once, which its :class:`~sdmaker.engine.StepBatcher` runs together.

A worker is told what to serve by one :class:`~sdmaker.serving._protocol.WorkerConfig` on its stdin; it
may start from a warm standby process (:mod:`._standby`) that already imported torch and diffusers and
reads the same line: it then only loads its model. ``describe()["standby"]`` says which path a worker took and the
endpoint log says why a fresh process was started instead.

Failure handling, so that no request ever hangs:

* a worker that exits is restarted (with backoff) while its pool is open; a request it was serving sees
  the connection drop and is answered with :class:`~sdmaker.errors.InvocationFailedError`;
* a request over its time budget gets :class:`~sdmaker.errors.InvocationTimeoutError`; its worker stops it at
  the next step boundary and carries on; a worker is killed (and restarted) only when it answers neither the
  request nor ``/ping`` for a grace period after the deadline (it may be stuck in a C loop);
* waiting for an idle worker is bounded by the same budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from sdmaker.errors import WorkerStartError
from sdmaker.serving._protocol import ServerState, WorkerConfig
from sdmaker.serving._worker_secret import WORKER_TOKEN_ENV, new_worker_secret
from sdmaker.serving.daemon._spawn import free_port, spawn_worker_process
from sdmaker.serving.daemon._standby import StandbyPool

__all__ = ["FORWARDED_HEADERS", "Worker", "WorkerReply", "WorkerSpec", "WorkerState"]

logger = logging.getLogger(__name__)

#: How often readiness is polled while a worker loads.
_POLL_S = 0.1
#: Headers forwarded to the worker (SageMaker strips everything else, contract 1.4/1.5); the pool adds the daemon's
#: validation mark (:data:`~sdmaker.serving._protocol.VALIDATED_HEADER`), which the daemon sets itself.
FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes",
                     "x-amzn-sagemaker-inference-id", "x-amzn-sagemaker-target-variant",
                     "x-amzn-sagemaker-target-model")


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (asyncio's child watcher does that)."""
    if not hasattr(os, "waitid"):  # not Linux/BSD: trust asyncio's returncode alone
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already: asyncio's returncode follows
        return True


class WorkerState(str, enum.Enum):
    """Life of one worker process."""

    STARTING = "Starting"
    READY = "Ready"
    BUSY = "Busy"
    RESTARTING = "Restarting"
    FAILED = "Failed"
    STOPPED = "Stopped"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to (re)start a worker of one endpoint variant.

    ``config`` is what every worker of the variant is told; each (re)start fills in its own port, status
    file and id. Its ``environment`` is also the process environment a fresh worker starts with (the
    interpreter and native libraries read some variables before any Python code runs).
    """

    config: WorkerConfig
    python: str
    run_dir: Path
    startup_timeout_s: float = 600.0

    @property
    def log_file(self) -> Path:
        assert self.config.log_file is not None
        return self.config.log_file

    @property
    def env(self) -> dict[str, str]:
        return dict(self.config.environment or {})

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def slots(self) -> int:
        """Requests one worker takes at a time: 1, or ``max_batch`` when it batches steps."""
        return max(1, self.config.max_batch)


@dataclass
class WorkerReply:
    """A worker's answer, read fully (bodies are capped at a few MiB)."""

    status: int
    headers: dict[str, str]
    body: bytes
    worker: int
    #: seconds the request spent on its worker (queueing excluded) and the requests that worker ran meanwhile
    service_s: float | None = None
    concurrency: float = 1.0
    #: the body was streamed to the caller's ``on_chunk`` as it came (``body`` holds only what came after)
    streamed: bool = False


class Worker:
    """One worker process; restarted in place (same index, new pid and port).

    Its state, request slots and last error change only through its own methods: :meth:`spawn`,
    :meth:`wait_ready`, :meth:`take_slot` / :meth:`release_slot` (dispatch), :meth:`restarting`,
    :meth:`start_failed`, :meth:`give_up` and :meth:`stop` (its pool's monitor).
    """

    def __init__(self, spec: WorkerSpec, index: int, tag: str, standbys: StandbyPool | None = None) -> None:
        self.spec = spec
        self.index = index
        self.tag = tag
        self.standbys = standbys
        self.from_standby = False
        self._refill_standby = False
        self.generation = 0  # bumped on every (re)start: dispatch slots of a previous process are void
        self.inflight = 0
        self.peak_inflight = 0
        self.served = 0  # requests dispatched to this worker (any process of it): the load spread in describe
        self.startup_seconds: float | None = None
        self.state = WorkerState.STARTING
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.error: str | None = None
        self.started_at = 0.0
        self.load_seconds: float | None = None
        self.log_path = spec.log_file
        self.status_file = spec.run_dir / f"{tag}-worker-{index}.status.json"
        self.secret = ""  # this process's secret: it answers /invocations only with it (._worker_secret)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """Whether the process is running: asked of the OS, since asyncio sets ``returncode`` only once it has
        reaped the child (a killed worker's slots must not be handed out meanwhile)."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        return not _exited(self.proc.pid)

    def describe(self) -> dict[str, object]:
        return {"index": self.index, "state": self.state.value, "pid": self.proc.pid if self.proc else None,
                "port": self.port, "restarts": self.restarts, "error": self.error,
                "load_seconds": self.load_seconds, "startup_seconds": self.startup_seconds,
                "standby": self.from_standby, "max_batch": self.spec.max_batch, "peak_in_flight": self.peak_inflight,
                "in_flight": self.inflight, "served": self.served,
                "log": str(self.log_path)}

    @property
    def serving(self) -> bool:
        """Alive and ready for requests (idle or with requests in flight)."""
        return self.alive and self.state in (WorkerState.READY, WorkerState.BUSY)

    def _config(self) -> WorkerConfig:
        env = self.spec.env
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[WORKER_TOKEN_ENV] = self.secret  # read through sdmaker.config as Settings.worker_token
        return self.spec.config.model_copy(update={
            "port": self.port, "host": "127.0.0.1", "status_file": self.status_file,
            "worker_id": f"{self.tag}-{self.index}", "environment": env})

    # -- transitions (dispatch and the pool's monitor) ---------------------------------------------

    def take_slot(self) -> None:
        """A request goes to this worker."""
        self.state = WorkerState.BUSY
        self.inflight += 1
        self.served += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)

    def release_slot(self, generation: int, *, healthy: bool) -> bool:
        """A request of process ``generation`` ended; True when its slot may take the next request.

        A slot of an earlier process died with it; an unhealthy end (timeout, broken connection) returns
        no slot: the worker is being killed and its monitor offers fresh ones after the restart.
        """
        if generation != self.generation:
            return False
        self.inflight -= 1
        if not (healthy and self.alive and self.state == WorkerState.BUSY):
            return False
        if self.inflight == 0:
            self.state = WorkerState.READY
        return True

    def lost(self, generation: int) -> None:
        """The process of ``generation`` broke a connection or stopped answering: kill it now and hand out
        none of its slots; its monitor restarts it."""
        if generation != self.generation:
            return
        self.kill()
        if self.state in (WorkerState.READY, WorkerState.BUSY):
            self.state = WorkerState.RESTARTING

    def restarting(self) -> None:
        """The process exited while its pool was open; a restart follows."""
        self.state = WorkerState.RESTARTING
        self.restarts += 1

    def start_failed(self, error: str) -> None:
        """A (re)start did not reach ready: keep the error for ``describe`` and kill what is left."""
        self.error = error
        self.kill()

    def give_up(self) -> None:
        """Too many failed restarts in a row: the worker stays down."""
        self.state = WorkerState.FAILED

    async def spawn(self) -> None:
        """Start the process, from a warm standby when one fits (does not wait for the model to load)."""
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.status_file.unlink(missing_ok=True)
        self.port = free_port()
        self.secret = new_worker_secret()
        config = self._config()
        env = config.environment or {}
        standby, why = (None, "") if self.standbys is None else self.standbys.take(self.spec.python, env)
        stamp = f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} [{self.tag}] starting worker {self.index} on port {self.port}"
        self.from_standby = False
        if standby is not None:
            with open(self.log_path, "ab") as log:
                log.write(f"{stamp} from warm standby pid {standby.proc.pid} (torch/diffusers already imported)\n"
                          .encode())
            self._refill_standby = True
            try:
                await standby.assign(config)
                self.proc, self.from_standby = standby.proc, True
            except OSError as exc:  # it died between take() and now: start fresh instead
                why = f"the standby died before its assignment ({type(exc).__name__})"
                self._release_standby()
        if not self.from_standby:
            with open(self.log_path, "ab") as log:
                log.write(f"{stamp} as a fresh process{f' ({why})' if why else ''}\n".encode())
                log.flush()
                self.proc = await spawn_worker_process(self.spec.python, env=env, standby=False, stdout=log,
                                                       stderr=asyncio.subprocess.STDOUT)
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):  # it died at once: the monitor sees the exit code
                self.proc.stdin.write(config.to_line())
                await self.proc.stdin.drain()
            self.proc.stdin.close()
        assert self.proc is not None
        self.started_at = time.monotonic()
        self.state = WorkerState.STARTING
        self.error = None
        self.generation += 1
        self.inflight = 0
        self.startup_seconds = None
        logger.info("endpoint worker %s-%d: pid %d port %d (%s)", self.tag, self.index, self.proc.pid, self.port,
                    "warm standby" if self.from_standby else "fresh process")

    def _release_standby(self) -> None:
        """The standby this worker took has been used (or lost): let the pool start the next one now."""
        if self._refill_standby and self.standbys is not None:
            self.standbys.refill()
        self._refill_standby = False

    def _read_status(self) -> dict[str, object]:
        try:
            data = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _failure_text(self) -> str:
        status = self._read_status()
        if status.get("error"):
            return str(status["error"])
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4000))
                tail = fh.read().decode(errors="replace").strip().splitlines()[-15:]
        except OSError:
            tail = []
        code = self.proc.returncode if self.proc else None
        return f"worker exited with code {code} before it was ready" + (": " + "\n".join(tail) if tail else "")

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        """Wait until ``/ping`` answers 200; raise :class:`WorkerStartError` with the worker's own error."""
        try:
            await self._wait_ready(client)
        finally:  # loaded or failed: a replacement standby no longer competes with this load for the CPU
            self._release_standby()

    async def _wait_ready(self, client: httpx.AsyncClient) -> None:
        deadline = self.started_at + self.spec.startup_timeout_s
        assert self.proc is not None
        while True:
            if self.proc.returncode is not None:
                raise WorkerStartError(self._failure_text(), worker=self.index)
            if self._read_status().get("state") == ServerState.FAILED.value:
                raise WorkerStartError(self._failure_text(), worker=self.index)
            try:
                reply = await client.get(f"{self.url}/ping", timeout=2.0)
                if reply.status_code == 200:
                    self.state = WorkerState.READY
                    self.startup_seconds = round(time.monotonic() - self.started_at, 3)
                    status = self._read_status()
                    load = status.get("load_seconds")
                    self.load_seconds = float(load) if isinstance(load, (int, float)) else None
                    return
                if reply.status_code == 500:
                    with contextlib.suppress(ValueError):
                        err = reply.json().get("error")
                        if err:
                            raise WorkerStartError(str(err), worker=self.index)
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise WorkerStartError(
                    f"worker did not pass /ping within {self.spec.startup_timeout_s:.0f} s "
                    "(ContainerStartupHealthCheckTimeoutInSeconds)", worker=self.index)
            await asyncio.sleep(_POLL_S)

    def kill(self) -> None:
        if self.state in (WorkerState.READY, WorkerState.BUSY):
            self.state = WorkerState.RESTARTING  # takes no request from now on, even before it is reaped
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (SageMaker gives 30 s; workers hold no state)."""
        self.state = WorkerState.STOPPED
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except asyncio.TimeoutError:
            self.kill()
            await self.proc.wait()
