"""Warm standby workers, the daemon side: which standby may become which worker, and keeping them stocked.

Why: a fresh worker spends 5-10 s (35 s on a loaded 2-core machine) importing torch, diffusers and
transformers before it reads an 11 MB model in a fraction of a second. The daemon therefore keeps
``SDMAKER_STANDBY_WORKERS`` (default 1) processes started ahead of time with
``python -m sdmaker.serving.container --standby`` (the child side: :mod:`sdmaker.serving.container._standby`):
each imports the heavy modules, prints one ready line on stdout, then blocks reading its
:class:`~sdmaker.serving._protocol.WorkerConfig` on stdin, the same line a fresh worker reads.

On assignment it makes the process environment exactly the config's (so :func:`sdmaker.config.load_settings`
sees the endpoint's settings), applies the torch thread count (``OMP_NUM_THREADS``), points fds 1/2 at the
endpoint's log and continues as a fresh worker would: same status file, same ``/ping`` contract, same
exit codes. The daemon then starts a replacement once the
assigned worker finished loading, so the replacement's imports do not compete with that load.

Compatibility (:func:`incompatible_env`): a standby is only used when the worker would run the same
interpreter (per-model virtual environments from ``code/requirements.txt`` always start fresh) and the
environments differ only in variables nobody reads at import or process start. Variables read then
(listed in :data:`IMPORT_TIME_PREFIXES`) were already consumed by the standby with *its* values: torch
and oneDNN/MKL/OpenMP runtimes read their tuning variables when the shared library loads, Hugging Face
libraries resolve cache paths, offline mode and verbosity at import, the interpreter reads
``PYTHON*``/``LD_*``/locale at startup, and ``PATH``/``HOME`` feed paths computed at import. The two
exceptions are ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``: ``torch.set_num_threads`` resets both
thread pools at run time, so the standby applies them after assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdmaker.serving._protocol import READY_MARK, WorkerConfig
from sdmaker.serving.daemon._spawn import spawn_worker_process

__all__ = ["IMPORT_TIME_PREFIXES", "RUNTIME_KEYS", "Standby", "StandbyPool", "incompatible_env"]

logger = logging.getLogger(__name__)

#: Environment prefixes (and exact names) read when a library loads or the interpreter starts.
IMPORT_TIME_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "DNNL_", "ONEDNN_", "OPENBLAS_", "CUDA_", "NVIDIA_",
                        "PYTORCH_", "TORCH", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TOKENIZERS_",
                        "XDG_", "PYTHON", "LD_", "MALLOC_", "GLIBC_", "LC_", "LANG", "PATH", "HOME", "TMPDIR")
#: Read at run time after all: ``torch.set_num_threads`` re-sizes the OpenMP and MKL pools.
RUNTIME_KEYS = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS"})
#: Give up replacing standbys after this many died in a row before becoming ready (broken interpreter).
_MAX_FAILURES = 5


def incompatible_env(standby: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """Names of variables whose difference rules out a standby started with ``standby`` (sorted; empty = fine)."""
    differing = {k for k in set(standby) | set(wanted) if standby.get(k) != wanted.get(k)}
    return sorted(k for k in differing if k not in RUNTIME_KEYS and k.startswith(IMPORT_TIME_PREFIXES))


# -- the daemon side -------------------------------------------------------------------------------------


class Standby:
    """One standby process as the daemon sees it."""

    def __init__(self, proc: asyncio.subprocess.Process, python: str, env: Mapping[str, str]) -> None:
        self.proc = proc
        self.python = python
        self.env = dict(env)
        self.ready = False
        self.assigned = False
        self.import_seconds: float | None = None
        self.spawned = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def describe(self) -> dict[str, object]:
        return {"pid": self.proc.pid, "state": "ready" if self.ready else "importing", "python": self.python,
                "import_seconds": self.import_seconds}

    async def assign(self, config: WorkerConfig) -> None:
        """Hand this standby its worker configuration; raises ``OSError`` when it died meanwhile."""
        assert self.proc.stdin is not None
        self.assigned = True
        try:
            self.proc.stdin.write(config.to_line())
            await self.proc.stdin.drain()
        finally:
            self.proc.stdin.close()


class StandbyPool:
    """Keeps ``count`` standby workers for one interpreter and environment; owned by the endpoint manager.

    Args:
        count: standbys to keep (0: none; :meth:`take` then always says why not).
        python: the interpreter standbys run (``sys.executable``; other interpreters never match).
        env: the environment standbys start with (what a worker of a default model would get).
        log_file: where standbys write until assigned (imports' warnings, crashes).
    """

    def __init__(self, *, count: int, python: str, env: Mapping[str, str], log_file: Path) -> None:
        self.count = max(0, count)
        self.python = python
        self.env = {**env, "PYTHONUNBUFFERED": env.get("PYTHONUNBUFFERED", "1")}
        self.log_file = log_file
        self.standbys: list[Standby] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._failures = 0
        self._lock = asyncio.Lock()
        self.spawned = 0
        self.used = 0

    def describe(self) -> dict[str, object]:
        return {"count": self.count, "spawned": self.spawned, "used": self.used, "failures": self._failures,
                "standbys": [s.describe() for s in self.standbys if s.alive and not s.assigned]}

    def _task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        """Spawn the missing standbys in the background (never waits for their imports)."""
        self.refill()

    def refill(self, delay_s: float = 0.0) -> None:
        """Bring the pool back to ``count`` live standbys, after ``delay_s`` (idempotent)."""
        if self._closing or self.count == 0 or self._failures >= _MAX_FAILURES:
            return
        self._task(self._fill(delay_s), "standby-refill")

    async def _fill(self, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        async with self._lock:  # concurrent refills must not overshoot the count
            while (not self._closing and self._failures < _MAX_FAILURES
                   and sum(1 for s in self.standbys if s.alive and not s.assigned) < self.count):
                try:
                    await self._spawn()
                except OSError as exc:
                    logger.error("could not start a standby worker: %s", exc)
                    self._failures += 1
                    return

    async def _spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting a standby worker\n".encode())
            log.flush()
            proc = await spawn_worker_process(self.python, env=self.env, standby=True,
                                              stdout=asyncio.subprocess.PIPE, stderr=log)
        standby = Standby(proc, self.python, self.env)
        self.standbys.append(standby)
        self.spawned += 1
        logger.info("standby worker pid %d starting", proc.pid)
        self._task(self._watch(standby), f"standby-{proc.pid}")

    async def _watch(self, standby: Standby) -> None:
        """Mark ``standby`` ready on its ready line; replace it if it dies before being assigned."""
        assert standby.proc.stdout is not None
        async for raw in standby.proc.stdout:
            text = raw.decode(errors="replace").strip()
            if text.startswith(READY_MARK):
                with contextlib.suppress(ValueError, IndexError):
                    standby.import_seconds = float(json.loads(text.split(" ", 1)[1])["import_seconds"])
                standby.ready = True
                self._failures = 0
                logger.info("standby worker pid %d ready (imports %.1f s)", standby.proc.pid,
                            standby.import_seconds or 0.0)
        if standby.assigned:
            return  # stdout closed because it became a worker: its pool watches it from now on
        code = await standby.proc.wait()
        with contextlib.suppress(ValueError):
            self.standbys.remove(standby)
        if self._closing or standby.assigned:
            return
        self._failures += 0 if standby.ready else 1
        if self._failures >= _MAX_FAILURES:
            logger.error("standby workers died %d times in a row before becoming ready (see %s); giving up",
                         self._failures, self.log_file)
            return
        logger.warning("standby worker pid %d exited with code %s; replacing it", standby.proc.pid, code)
        self.refill(delay_s=min(0.5 * 2 ** self._failures, 30.0))

    def take(self, python: str, env: Mapping[str, str]) -> tuple[Standby | None, str]:
        """A ready standby that can become a worker for ``python``/``env``, or ``(None, why not)``.

        The caller must :meth:`Standby.assign` it and, once its worker finished loading, call
        :meth:`refill` (a fallback refill runs anyway after a minute).
        """
        if self.count == 0:
            return None, "standby workers are off (SDMAKER_STANDBY_WORKERS=0)"
        if python != self.python:
            return None, f"the model runs its own interpreter {python}"
        bad = incompatible_env(self.env, env)
        if bad:
            return None, f"the environment differs from the standby's in {', '.join(bad)}, read at import time"
        for standby in self.standbys:
            if standby.ready and standby.alive and not standby.assigned:
                standby.assigned = True
                self.standbys.remove(standby)
                self.used += 1
                self.refill(delay_s=60.0)  # in case the caller never reports the load's end
                return standby, ""
        return None, "no standby worker is ready yet"

    async def close(self) -> None:
        """Stop every unassigned standby (assigned ones belong to their endpoint's pool)."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        waiting = [s for s in self.standbys if not s.assigned]
        for standby in waiting:
            with contextlib.suppress(ProcessLookupError):
                standby.proc.kill()  # it holds no state; SIGTERM would only add a grace period
        await asyncio.gather(*(s.proc.wait() for s in waiting), return_exceptions=True)
        self.standbys.clear()
