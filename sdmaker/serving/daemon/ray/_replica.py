"""One Ray Serve replica of an endpoint variant: the local worker, placed on a Ray node.

The replica runs the very worker the local backend runs (``python -m sdmaker.serving.container``: the
container contract, ``code/inference.py`` hooks, the default handler with step batching) as a child
process on its node, bound to 127.0.0.1 with a per-replica secret, and forwards each request to it.
One handler, two ways to place it: the daemon's :class:`~sdmaker.serving.daemon._pool.WorkerPool`
starts it as a local process, this actor starts it on whichever node Ray chose.

Startup: the model is fetched to the node by digest (:func:`~._artifacts.node_model`), its
interpreter prepared (``code/requirements.txt``), the worker spawned and ``/ping`` awaited; an error
on the way fails the replica's constructor, which Ray Serve reports and the daemon turns into the
endpoint's FailureReason.

Failures: the worker dying makes :meth:`Replica.check_health` fail, so Ray Serve replaces the replica;
a request it was serving fails with :class:`ReplicaLostError` (the daemon answers 424). The worker is a
child that Linux kills with the replica (``PR_SET_PDEATHSIG``), whether the replica stops or its node dies.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from sdmaker.config import load_settings
from sdmaker.serving._protocol import WorkerConfig
from sdmaker.serving._worker_secret import WORKER_TOKEN_ENV, auth_header, new_worker_secret
from sdmaker.serving.daemon._spawn import WORKER_MODULE, die_with_parent, free_port
from sdmaker.serving.daemon._variant import DAEMON_SECRETS, FORBIDDEN_ENV, python_for
from sdmaker.serving.daemon.ray._artifacts import node_model

__all__ = ["Replica", "ReplicaLostError"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1
#: How long past the request's own deadline the replica waits for its worker's reply.
_REPLY_GRACE_S = 10.0


class ReplicaLostError(RuntimeError):
    """The replica's worker died (or stopped answering) while serving a request."""


class Replica:
    """A Ray Serve deployment class (wrapped by ``serve.deployment`` in the daemon); ``spec`` is plain JSON.

    ``spec`` keys: ``digest``, ``s3_uri`` (or None), ``head_url``, ``token`` (to fetch the model from the
    daemon), ``cache_dir`` (None: ``$SDMAKER_HOME/ray-nodes`` on the node), ``model_env`` (the model's
    Environment), ``threads``, and the worker's ``model_name``, ``device``, ``dtype``, ``max_batch``,
    ``max_body_bytes``, ``startup_timeout_s``, ``tag``.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        import ray

        started = time.monotonic()
        settings = load_settings()
        ctx = ray.get_runtime_context()
        self.node_id = str(ctx.get_node_id())
        self.actor_id = str(ctx.get_actor_id())
        cache = Path(spec.get("cache_dir") or settings.home / "ray-nodes") / self.node_id
        fetched = node_model(spec["digest"], cache=cache, head_url=spec["head_url"], token=spec["token"],
                             s3_uri=spec.get("s3_uri"), s3_settings=settings)
        self.model_source = fetched.how
        node_settings = replace(settings, home=cache)
        python = python_for(fetched.path, node_settings)
        threads = str(int(spec.get("threads") or 1))
        self.secret = new_worker_secret()
        env = {k: v for k, v in settings.env.items() if k not in DAEMON_SECRETS}
        env.update({k: v for k, v in (spec.get("model_env") or {}).items() if k not in FORBIDDEN_ENV})
        env.update({"SDMAKER_HOME": str(cache), "PYTHONUNBUFFERED": "1", WORKER_TOKEN_ENV: self.secret})
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, env.get("OMP_NUM_THREADS") or threads)
        self.port = free_port()
        config = WorkerConfig(model_dir=fetched.path, port=self.port, model_name=spec.get("model_name"),
                              model_digest=spec["digest"], device=spec.get("device", "auto"),
                              dtype=spec.get("dtype", "auto"), max_batch=int(spec.get("max_batch", 0)),
                              max_body_bytes=int(spec.get("max_body_bytes", 6 * 1024 * 1024)),
                              trust_daemon_validation=True, environment=env, log_file=None,
                              worker_id=f"{spec.get('tag', 'ray')}-{self.actor_id[:8]}")
        self.proc: subprocess.Popen[bytes] | None = None
        self._spawn([python, "-m", WORKER_MODULE], env, config)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(float(spec.get("startup_timeout_s") or 600.0))
        self.startup_seconds = round(time.monotonic() - started, 3)
        self.broken = False
        self.served = 0
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None),
                                         limits=httpx.Limits(max_connections=max(4, int(spec.get("max_batch", 0)) * 2)))
        logger.info("replica %s on node %s: worker pid %d ready in %.1f s (model from %s)", self.actor_id[:8],
                    self.node_id[:8], self.proc.pid if self.proc else -1, self.startup_seconds, self.model_source)

    def _spawn(self, args: list[str], env: dict[str, str], config: WorkerConfig) -> None:
        """Start the worker from a thread that lives exactly as long as the worker: ``PR_SET_PDEATHSIG``
        fires when the *thread* that forked exits, so a short-lived thread would kill the worker with it."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, env=env, preexec_fn=die_with_parent)
                assert self.proc.stdin is not None
                self.proc.stdin.write(config.to_line())
                self.proc.stdin.close()
            except BaseException as exc:  # noqa: BLE001 - reported to the constructor
                failure.append(exc)
                return
            finally:
                ready.set()
            self.proc.wait()

        threading.Thread(target=run, name="sdmaker-worker", daemon=True).start()
        ready.wait()
        if failure:
            raise failure[0]

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the worker exited with code {self.proc.returncode} before it was ready "
                                       "(see this replica's log on its node)")
                try:
                    reply = client.get(f"{self.url}/ping")
                    if reply.status_code == 200:
                        return
                    if reply.status_code == 500:
                        error = reply.json().get("error")
                        if error:
                            raise RuntimeError(str(error))
                except (httpx.TransportError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not pass /ping within {timeout_s:.0f} s "
                                       "(ContainerStartupHealthCheckTimeoutInSeconds)")
                time.sleep(_POLL_S)

    async def invoke(self, body: bytes, headers: dict[str, str], deadline_s: float) -> dict[str, Any]:
        """Forward one invocation to the worker; its reply (any status) plus where it ran.

        Raises:
            ReplicaLostError: the worker died or did not answer within ``deadline_s`` plus a grace period.
        """
        self.served += 1
        started = time.monotonic()
        try:
            reply = await self._client.post(f"{self.url}/invocations", content=body,
                                            headers={**headers, **auth_header(self.secret)},
                                            timeout=httpx.Timeout(10.0, read=deadline_s + _REPLY_GRACE_S))
        except httpx.TransportError as exc:
            self.broken = True  # check_health fails from now on: Ray Serve replaces this replica
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            raise ReplicaLostError(f"the worker of replica {self.actor_id[:8]} on node {self.node_id[:8]} died "
                                   f"while serving the request ({type(exc).__name__})") from None
        return {"status": reply.status_code, "headers": dict(reply.headers), "body": reply.content,
                "replica": self.actor_id, "node": self.node_id, "pid": self.proc.pid if self.proc else None,
                "model_source": self.model_source, "startup_seconds": self.startup_seconds,
                "service_s": time.monotonic() - started}

    def describe(self) -> dict[str, Any]:
        """Where this replica runs and how it started (``endpoint describe``)."""
        return {"replica": self.actor_id, "node": self.node_id, "pid": self.proc.pid if self.proc else None,
                "model_source": self.model_source, "startup_seconds": self.startup_seconds, "served": self.served}

    def check_health(self) -> None:
        """Ray Serve's health check: the worker process is alive and has not broken a connection."""
        if self.broken or self.proc is None or self.proc.poll() is not None:
            raise ReplicaLostError(f"the worker of replica {self.actor_id[:8]} is gone "
                                   f"(exit code {self.proc.returncode if self.proc else None})")

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
