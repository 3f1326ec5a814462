"""Worker processes behind one endpoint: spawn, health-check, dispatch, restart.

Each worker is ``python -m sdmaker.serving.worker`` (the SageMaker container contract: ``GET /ping``,
``POST /invocations``) on a free loopback port. It loads the model once and answers one request at a
time, so a :class:`~._pool.WorkerPool` hands each request to an idle worker and concurrency equals the worker
count (SageMaker: ``InitialInstanceCount``). With step batching (``WorkerSpec.max_batch`` > 1) a worker
takes up to ``max_batch`` requests at once, which its :class:`~sdmaker.engine.StepBatcher` runs together.

A worker may start from a warm standby process (:mod:`._standby`) that already imported torch and
diffusers: it then only loads its model. ``describe()["standby"]`` says which path a worker took and the
endpoint log says why a fresh process was started instead.

Failure handling, so that no request ever hangs:

* a worker that exits is restarted (with backoff) while its pool is open; a request it was serving sees
  the connection drop and is answered with :class:`~sdmaker.errors.InvocationFailedError`;
* a request over its time budget gets :class:`~sdmaker.errors.InvocationTimeoutError` and its worker is
  killed (it may be stuck in a C loop) and restarted, as MMS does on a response timeout;
* waiting for an idle worker is bounded by the same budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from sdmaker.errors import WorkerStartError
from sdmaker.serving._worker_secret import WORKER_TOKEN_ENV, new_worker_secret

if TYPE_CHECKING:
    from sdmaker.serving._standby import StandbyPool

__all__ = ["FORWARDED_HEADERS", "Worker", "WorkerReply", "WorkerSpec", "WorkerState", "die_with_parent", "free_port"]

logger = logging.getLogger(__name__)

#: How often readiness is polled while a worker loads.
_POLL_S = 0.1
#: Headers forwarded to the worker (SageMaker strips everything else, contract 1.4/1.5).
FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes",
                     "x-amzn-sagemaker-inference-id", "x-amzn-sagemaker-target-variant")


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
    """Everything needed to (re)start a worker of one endpoint variant."""

    model_dir: Path
    python: str
    run_dir: Path
    log_file: Path
    env: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = 6 * 1024 * 1024
    device: str | None = None
    dtype: str | None = None
    startup_timeout_s: float = 600.0
    #: > 1: the worker batches UNet steps of up to this many concurrent requests (``--max-batch``)
    max_batch: int = 0

    @property
    def slots(self) -> int:
        """Requests one worker takes at a time: 1, or ``max_batch`` when it batches steps."""
        return max(1, self.max_batch)


@dataclass
class WorkerReply:
    """A worker's answer, read fully (bodies are capped at a few MiB)."""

    status: int
    headers: dict[str, str]
    body: bytes
    worker: int


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the worker binds it right after; a lost race means a restart)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the worker when the daemon dies, so a killed daemon leaves no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    """One worker process; restarted in place (same index, new pid and port)."""

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
        return self.proc is not None and self.proc.returncode is None

    def describe(self) -> dict[str, object]:
        return {"index": self.index, "state": self.state.value, "pid": self.proc.pid if self.proc else None,
                "port": self.port, "restarts": self.restarts, "error": self.error,
                "load_seconds": self.load_seconds, "startup_seconds": self.startup_seconds,
                "standby": self.from_standby, "max_batch": self.spec.max_batch, "peak_in_flight": self.peak_inflight,
                "log": str(self.log_path)}

    def _argv(self) -> list[str]:
        argv = ["--model-dir", str(self.spec.model_dir), "--port", str(self.port), "--host", "127.0.0.1",
                "--status-file", str(self.status_file), "--workers-id", f"{self.tag}-{self.index}",
                "--max-body-bytes", str(self.spec.max_body_bytes)]
        if self.spec.device:
            argv += ["--device", self.spec.device]
        if self.spec.dtype:
            argv += ["--dtype", self.spec.dtype]
        if self.spec.max_batch > 0:
            argv += ["--max-batch", str(self.spec.max_batch)]
        return argv

    async def spawn(self) -> None:
        """Start the process, from a warm standby when one fits (does not wait for the model to load)."""
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.status_file.unlink(missing_ok=True)
        self.port = free_port()
        argv = self._argv()
        env = dict(self.spec.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.secret = env[WORKER_TOKEN_ENV] = new_worker_secret()
        standby, why = (None, "") if self.standbys is None else self.standbys.take(self.spec.python, env)
        stamp = f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} [{self.tag}] starting worker {self.index} on port {self.port}"
        self.from_standby = False
        if standby is not None:
            with open(self.log_path, "ab") as log:
                log.write(f"{stamp} from warm standby pid {standby.proc.pid} (torch/diffusers already imported)\n"
                          .encode())
            self._refill_standby = True
            try:
                await standby.assign(argv, env, self.log_path)
                self.proc, self.from_standby = standby.proc, True
            except OSError as exc:  # it died between take() and now: start fresh instead
                why = f"the standby died before its assignment ({type(exc).__name__})"
                self._release_standby()
        if not self.from_standby:
            with open(self.log_path, "ab") as log:
                log.write(f"{stamp} as a fresh process{f' ({why})' if why else ''}\n".encode())
                log.flush()
                preexec = die_with_parent if sys.platform.startswith("linux") else None
                self.proc = await asyncio.create_subprocess_exec(
                    self.spec.python, "-m", "sdmaker.serving.worker", *argv, stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=preexec)
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
            if self._read_status().get("state") == "failed":
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
