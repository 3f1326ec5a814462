"""Compiled UNet steps: AOTInductor packages built once per model, size and machine, in a child process.

Why this shape (measured, see ``bench/peers.py`` and the README's performance section):

* Inductor with weight freezing makes the SD 2.1 UNet step faster than eager bf16 on the AMX Xeon (the
  peers bench prints by how much), and faster than OpenVINO's default compile. Compiling costs minutes
  on 2 cores, which a server earns back within tens of images and a one-shot CLI run never does.
* ``torch.compile`` in the serving process is not usable there: its tracer patches ``nn.Module.__call__``
  process-wide, so an eager step running on another thread during a compile failed (measured:
  ``NameError: module is not installed as a submodule``), and every new batch size recompiled inside a
  request for minutes.
* So the step is exported (``torch.export``, batch dimension dynamic, so step batching's changing batch
  sizes share one package) and compiled with AOTInductor in a **child process**, paused whenever the
  worker runs steps. The
  package is cached under ``$SDMAKER_HOME/cache/compiled`` by model, size, dtype, torch version and CPU
  flags (SageMaker Neo's "compile once"), and loading one takes milliseconds, with no tracing in the
  server. Until the package for a size exists, that size runs eager: no request ever waits for the
  compiler.

The cache is bounded (``SDMAKER_COMPILE_CACHE_GB``, default 10; an SD 2.1 package is 1.7 GB): after each build
the least recently used packages go first (:func:`prune_compiled_cache`), and so do temp files that a
killed build left behind. Deleting a package a live worker has loaded is safe: the worker keeps its copy.

Only the plain CFG step is compiled: batches with LoRA adapters (per-row forward hooks), DeepCache's
split passes and guidance-embedding UNets run eager. A compiled step's output differs from the eager
one in the last bf16 bits, like a step shared in a batch does.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdmaker.engine._device import cpu_flags
from sdmaker.engine._loader import LoadedModel
from sdmaker.errors import ConfigError
from sdmaker.files import pid_alive

__all__ = ["COMPILE_MODES", "StepCompiler", "compile_decision", "enable_compiled_steps", "prune_compiled_cache"]

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
#: Below this many UNet parameters the compile never pays back (bench: on sd2-tiny only after ~10,000 steps);
#: SD 1.x/2.x UNets have ~860M, the built-in mini a few million.
MIN_PARAMS = 100_000_000
#: The batch dimension the export leaves free (CFG always doubles, so batch 1 runs eager).
MIN_BATCH, MAX_BATCH = 2, 63
#: A child compile that runs longer (paused time not counted) is abandoned (SD 2.1 at 512²: 3-6 minutes on 2 cores).
CHILD_TIMEOUT_S = 3600.0
#: The compile child runs only after the worker has done no request work for this long.
PAUSE_AFTER_BUSY_S = 2.0
#: The default bound on ``$SDMAKER_HOME/cache/compiled`` (``SDMAKER_COMPILE_CACHE_GB``).
DEFAULT_CACHE_BYTES = 10 * 1000**3


def compile_decision(model: LoadedModel, mode: str) -> tuple[bool, str]:
    """Whether ``model``'s steps get compiled under ``mode`` (``SDMAKER_COMPILE``), and why, for the log."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"SDMAKER_COMPILE must be one of {', '.join(COMPILE_MODES)}", field="SDMAKER_COMPILE",
                          value=mode)
    if mode == "off":
        return False, "SDMAKER_COMPILE=off"
    if model.placement.device != "cpu":
        return False, "compiled steps are built and measured for the CPU only"
    if mode == "on":
        return True, "SDMAKER_COMPILE=on"
    if model.placement.dtype_name != "bf16":
        return False, f"measured to pay back in bf16 only (this model runs {model.placement.dtype_name})"
    unet = getattr(model.pipeline.unet, "_orig_mod", model.pipeline.unet)
    params = sum(p.numel() for p in unet.parameters())
    if params < MIN_PARAMS:
        return False, f"a {params / 1e6:.1f}M-parameter UNet never pays its compile time back"
    return True, f"auto: a {params / 1e6:.0f}M-parameter UNet in bf16 on this CPU"


@functools.cache
def _machine_tag() -> str:
    flags = ",".join(sorted(cpu_flags()))
    return hashlib.sha256(f"{torch.__version__}|{flags}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StepKey:
    """What one package serves: a latent size and the text-embedding shape, for any batch size."""

    height: int
    width: int
    channels: int
    seq: int
    dim: int
    dtype: str

    def name(self) -> str:
        return f"step-{self.channels}x{self.height}x{self.width}-e{self.seq}x{self.dim}-{self.dtype}"


@dataclass
class StepCompiler:
    """Compiled step runners of one loaded model, built in the background on first sight of a size."""

    model: LoadedModel
    cache_dir: Path
    max_sizes: int = 2
    cache_bytes: int = DEFAULT_CACHE_BYTES
    runners: dict[StepKey, Any] = field(default_factory=dict)
    failed: dict[StepKey, str] = field(default_factory=dict)
    pending: set[StepKey] = field(default_factory=set)
    compile_seconds: dict[StepKey, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queue: queue.Queue[StepKey | None] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None
    _child: subprocess.Popen[bytes] | None = None
    _closed: bool = False
    _last_busy: float = 0.0

    @property
    def folder(self) -> Path:
        ident = self.model.digest if self.model.digest not in (None, "", "-") else str(self.model.path)
        return self.cache_dir / hashlib.sha256(ident.encode()).hexdigest()[:16] / _machine_tag()

    def package_path(self, key: StepKey) -> Path:
        return self.folder / f"{key.name()}.pt2"

    def runner_for(self, sample: torch.Tensor, embeds: torch.Tensor) -> Any | None:
        """The compiled step for these inputs, or ``None`` (run eager); schedules a compile for a new size."""
        if self._closed or not MIN_BATCH <= sample.shape[0] <= MAX_BATCH or embeds.shape[0] != sample.shape[0]:
            return None
        key = StepKey(int(sample.shape[2]), int(sample.shape[3]), int(sample.shape[1]), int(embeds.shape[1]),
                      int(embeds.shape[2]), str(sample.dtype).removeprefix("torch."))
        runner = self.runners.get(key)
        if runner is not None:
            return runner
        with self._lock:
            if key in self.failed or key in self.pending or len(self.runners) + len(self.pending) >= self.max_sizes:
                return None
            self.pending.add(key)
        self._queue.put(key)
        self._ensure_thread()
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no compile is pending (tests, ``bench``); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        """Stop the background compiler (the worker is exiting); a running child is terminated."""
        self._closed = True
        self._queue.put(None)
        child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # a paused child would not act on SIGTERM

    # --- background work ----------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="sdmaker-step-compiler", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None or self._closed:
                return
            try:
                path = self.package_path(key)
                self.folder.mkdir(parents=True, exist_ok=True)
                # one build per package on this machine: a second worker of the model waits, then loads it
                with open(self.folder / f".{key.name()}.lock", "a+b") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # held while loading too: the cache never evicts a locked one
                    if not path.exists() and not self._closed:
                        self._build(key, path)
                    if self._closed:
                        return
                    runner = torch._inductor.aoti_load_package(str(path))
                    with contextlib.suppress(OSError):
                        os.utime(path)  # the cache evicts least recently used first: this package was just used
                self.runners[key] = runner
                logger.info("compiled UNet step ready for %s (%s)", key.name(), path)
            except Exception as exc:  # noqa: BLE001 - a failed compile only means this size stays eager
                self.failed[key] = str(exc)[-500:]
                logger.warning("UNet step for %s stays eager: compile failed: %s", key.name(), str(exc)[-300:])
            finally:
                with self._lock:
                    self.pending.discard(key)

    def _build(self, key: StepKey, path: Path) -> None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # AOTInductor wants the suffix
        spec = {"model_dir": str(self.model.path), "dtype": key.dtype, "height": key.height, "width": key.width,
                "channels": key.channels, "seq": key.seq, "dim": key.dim, "out": str(tmp)}
        started = time.perf_counter()
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: a paused reader must not block the child
            child = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
                [sys.executable, "-m", "sdmaker.engine._compile_child", json.dumps(spec), str(os.getpid())],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            self._child = child
            try:
                ran = self._supervise(child)
            finally:
                self._child = None
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
        if child.returncode != 0 or not tmp.exists():
            tmp.unlink(missing_ok=True)
            why = f"ran over {CHILD_TIMEOUT_S:.0f}s" if ran > CHILD_TIMEOUT_S else f"exited {child.returncode}"
            raise RuntimeError(f"compile child {why}: {tail[-400:]}")
        os.replace(tmp, path)
        self.compile_seconds[key] = time.perf_counter() - started
        prune_compiled_cache(self.cache_dir, self.cache_bytes, keep=path)
        logger.info("compiled the UNet step for %s in %.0fs (%.0fs of it running, paused while serving)",
                    key.name(), self.compile_seconds[key], ran)

    def note_busy(self) -> None:
        """The worker is at work (a request being encoded, stepped or decoded): the compile child pauses."""
        self._last_busy = time.monotonic()

    def _supervise(self, child: subprocess.Popen[bytes]) -> float:
        """Wait for ``child``, stopping it (SIGSTOP, its whole process group) while the worker runs steps.

        Measured serving SD 2.1 at 256² beside a running compile: requests took 18-29 s instead of 6 s even
        with the child at ``SCHED_IDLE`` (40 s at nice 10), as the worker's OpenMP team waits at every
        barrier for a displaced thread. Paused, the compile costs the server nothing; it advances in idle
        gaps, so under unbroken load the size stays eager. Returns the seconds the child ran.
        """
        ran, stopped = 0.0, False
        last = time.monotonic()
        while child.poll() is None:
            now = time.monotonic()
            if not stopped:
                ran += now - last
            last = now
            busy = now - self._last_busy < PAUSE_AFTER_BUSY_S
            try:
                if busy and not stopped:
                    os.killpg(child.pid, signal.SIGSTOP)
                    stopped = True
                elif not busy and stopped:
                    os.killpg(child.pid, signal.SIGCONT)
                    stopped = False
                if self._closed or ran > CHILD_TIMEOUT_S:
                    os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.05 if busy else 0.1)
        return ran


def prune_compiled_cache(cache_dir: Path, max_bytes: int, *, keep: Path | None = None) -> list[Path]:
    """Bound the compiled-step cache: remove least recently used packages until it fits in ``max_bytes``.

    Also removes temp files of builds whose process is gone (a worker killed mid-compile leaves its
    ``.<name>.<pid>.tmp.pt2``). ``keep`` (the package just built) is never removed, nor is a package whose
    build lock another process holds. ``max_bytes`` 0 means no bound. Returns what was removed.
    """
    root = Path(cache_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    packages: list[tuple[float, int, Path]] = []
    for path in root.rglob("*.pt2"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.name.startswith("."):
            pid = path.name.removesuffix(".tmp.pt2").rsplit(".", 1)[-1]
            if path.name.endswith(".tmp.pt2") and pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
            continue
        packages.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in packages)
    for _, size, path in sorted(packages):
        if not max_bytes or total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        with contextlib.suppress(OSError), open(path.with_name(f".{path.stem}.lock"), "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built or waited on by another worker right now
            path.unlink()
            removed.append(path)
            total -= size
            logger.info("compiled-step cache over %.1f GB: removed %s (least recently used)", max_bytes / 1e9, path)
    return removed


def enable_compiled_steps(model: LoadedModel, mode: str, cache_dir: Path, *, max_sizes: int = 2,
                          cache_bytes: int = DEFAULT_CACHE_BYTES) -> StepCompiler | None:
    """Attach a :class:`StepCompiler` to ``model`` when :func:`compile_decision` says so; returns it."""
    on, why = compile_decision(model, mode)
    logger.info("compiled UNet steps for %s: %s (%s)", model.name, "on" if on else "off", why)
    if not on:
        model.step_compiler = None
        return None
    compiler = StepCompiler(model, Path(cache_dir), max_sizes=max_sizes, cache_bytes=cache_bytes)
    model.step_compiler = compiler
    return compiler
