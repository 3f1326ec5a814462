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

Two backends build into this cache (``SDMAKER_ENGINE``, :func:`engine_decision`):

* ``aoti`` (engine ``torch``): the plain CFG step only; DeepCache's split passes run eager;
* ``openvino``: the whole UNet returning DeepCache's deep feature too (a plain step drops it) and DeepCache's
  shallow pass, converted to OpenVINO IR (:mod:`sdmaker.engine._openvino`), so the default fast recipes
  (DeepCache on) run every UNet call compiled.

Batches with LoRA adapters (per-row forward hooks) and guidance-embedding UNets run eager on both. A compiled
step's output differs from the eager one in the last bf16 bits, like a step shared in a batch does.
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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdmaker.config import ENGINES, check_engine
from sdmaker.engine._device import cpu_flags
from sdmaker.engine._loader import LoadedModel
from sdmaker.errors import ConfigError
from sdmaker.files import pid_alive

__all__ = ["COMPILE_MODES", "ENGINES", "StepCompiler", "compile_decision", "enable_compiled_steps", "engine_decision",
           "prune_compiled_cache"]

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
#: The DeepCache branch a plain step's OpenVINO ``full`` pass is exported for (the loop's default branch), so
#: plain and DeepCache steps of the default recipes share one export.
DEFAULT_BRANCH = 2
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


def engine_decision(engine: str) -> tuple[str, str]:
    """The backend (``aoti`` or ``openvino``) that builds compiled passes under ``engine``, and why, for the log.

    ``auto`` takes the engine measured fastest end to end with step batching and DeepCache on
    (``bench/openvino_engine.py``): OpenVINO on CPUs with AVX512-BF16, with or without AMX (the AMD EPYC:
    1.24-1.27x the torch engine's served images/s; the AMX Xeon: 1.19x and 1.24x in two runs, 2026-12-03, where
    its plain step also beat torch's compiled one by 1.11x in ``bench/peers.py``). On CPUs without native bf16
    it was never measured, so ``auto`` keeps torch's AOTInductor path there. ``openvino`` asked for explicitly
    but not installed is an error naming the setting.
    """
    from sdmaker.engine._openvino import openvino_available

    check_engine(engine)
    if engine == "torch":
        return "aoti", "SDMAKER_ENGINE=torch"
    if engine == "openvino":
        if not openvino_available():
            raise ConfigError("SDMAKER_ENGINE=openvino needs the openvino package (pip install openvino)",
                              field="SDMAKER_ENGINE", value=engine)
        return "openvino", "SDMAKER_ENGINE=openvino"
    flags = set(cpu_flags())
    if "avx512_bf16" not in flags:
        return "aoti", "auto: OpenVINO measured to win end to end only on AVX512-BF16 CPUs; this CPU lacks avx512_bf16"
    if not openvino_available():
        return "aoti", "auto: openvino is not installed"
    return "openvino", ("auto: OpenVINO, measured 1.19-1.27x the torch engine end to end on AVX512-BF16 CPUs "
                        f"({'with' if 'amx_bf16' in flags else 'without'} AMX here)")


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
    kind: str = "step"  # "step" (AOTInductor), or an OpenVINO pass: "full" / "shallow" of DeepCache ``branch``
    branch: int = 0

    def name(self) -> str:
        shape = f"{self.channels}x{self.height}x{self.width}-e{self.seq}x{self.dim}-{self.dtype}"
        return f"step-{shape}" if self.kind == "step" else f"ov-{self.kind}{self.branch}-{shape}"

    def size(self) -> tuple[int, ...]:
        """What the per-worker size bound counts: a latent size's passes share one weights copy."""
        return (self.height, self.width, self.channels, self.seq, self.dim)


@dataclass
class StepCompiler:
    """Compiled step runners of one loaded model, built in the background on first sight of a size."""

    model: LoadedModel
    cache_dir: Path
    max_sizes: int = 2
    cache_bytes: int = DEFAULT_CACHE_BYTES
    backend: str = "aoti"  # or "openvino" (see engine_decision)
    build: bool = True  # False: only load packages already in the cache (one-shot runs never build)
    static_batches: int = 1  # OpenVINO: batch sizes that get a static-shape copy of a pass (OpenVinoRunner)
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
    _active: int = 0

    @property
    def folder(self) -> Path:
        ident = self.model.digest if self.model.digest not in (None, "", "-") else str(self.model.path)
        return self.cache_dir / hashlib.sha256(ident.encode()).hexdigest()[:16] / _machine_tag()

    def package_path(self, key: StepKey) -> Path:
        """An AOTInductor ``.pt2`` file, or an OpenVINO IR folder (``.ov``: model.xml + model.bin)."""
        return self.folder / (f"{key.name()}.pt2" if key.kind == "step" else f"{key.name()}.ov")

    def runner_for(self, sample: torch.Tensor, embeds: torch.Tensor, *, kind: str = "step",
                   branch: int = DEFAULT_BRANCH) -> Any | None:
        """The compiled pass for these inputs, or ``None`` (run eager); schedules a build for a new size.

        ``kind``: ``step`` (a plain CFG step: ``(sample, t, embeds) -> prediction``), or DeepCache's ``full``
        (``-> (prediction, deep feature)``) and ``shallow`` (``(sample, t, embeds, feature) -> prediction``),
        which only the OpenVINO backend builds.
        """
        if self._closed or not MIN_BATCH <= sample.shape[0] <= MAX_BATCH or embeds.shape[0] != sample.shape[0]:
            return None
        plain = kind == "step"
        if self.backend == "aoti":
            if not plain:
                return None
            key_kind, key_branch = "step", 0
        else:
            key_kind, key_branch = ("full", DEFAULT_BRANCH) if plain else (kind, branch)
        key = StepKey(int(sample.shape[2]), int(sample.shape[3]), int(sample.shape[1]), int(embeds.shape[1]),
                      int(embeds.shape[2]), str(sample.dtype).removeprefix("torch."), key_kind, key_branch)
        runner = self.runners.get(key)
        if runner is not None:
            if plain and key_kind == "full":
                return lambda s, t, e: runner(s, t, e)[0]  # the feature output is not needed
            return runner
        with self._lock:
            known = (*self.runners, *self.pending)
            sizes = {k.size() for k in known}
            # one weights copy per size (what the worker's memory budget counts): a full pass for a second
            # DeepCache branch of a size would be another, so that branch's full steps stay eager
            second_full = key.kind == "full" and any(k.kind == "full" and k.size() == key.size() for k in known)
            if (key in self.failed or key in self.pending or second_full
                    or (key.size() not in sizes and len(sizes) >= self.max_sizes)):
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
                if not self.build and not path.exists():
                    self.failed[key] = "not in the cache (this process only loads passes a serving worker built)"
                    logger.info("UNet pass %s runs eager: %s", key.name(), self.failed[key])
                    continue
                self.folder.mkdir(parents=True, exist_ok=True)
                # one build per package on this machine: a second worker of the model waits, then loads it
                with open(self.folder / f".{key.name()}.lock", "a+b") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # held while loading too: the cache never evicts a locked one
                    if not path.exists() and not self._closed:
                        self._build(key, path)
                    if self._closed:
                        return
                    runner = self._load(key, path)
                    with contextlib.suppress(OSError):
                        os.utime(path)  # the cache evicts least recently used first: this package was just used
                self.runners[key] = runner
                logger.info("compiled UNet pass ready (%s backend): %s (%s)", self.backend, key.name(), path)
            except Exception as exc:  # noqa: BLE001 - a failed compile only means this size stays eager
                self.failed[key] = str(exc)[-500:]
                logger.warning("UNet pass %s stays eager: the %s build failed: %s", key.name(), self.backend,
                               str(exc)[-300:])
            finally:
                with self._lock:
                    self.pending.discard(key)

    def _load(self, key: StepKey, path: Path) -> Any:
        if key.kind == "step":
            return torch._inductor.aoti_load_package(str(path))
        from sdmaker.engine._openvino import OpenVinoRunner

        return OpenVinoRunner(path, precision="bf16" if key.dtype == "bfloat16" else "f32",
                              static_batches=self.static_batches)

    def _build(self, key: StepKey, path: Path) -> None:
        # AOTInductor wants the .pt2 suffix; the OpenVINO child writes its own temp folder and renames it to ``out``
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2") if key.kind == "step" else path
        spec = {"model_dir": str(self.model.path), "dtype": key.dtype, "height": key.height, "width": key.width,
                "channels": key.channels, "seq": key.seq, "dim": key.dim, "out": str(tmp),
                "backend": "aoti" if key.kind == "step" else "openvino", "kind": key.kind, "branch": key.branch}
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
            if tmp != path:
                tmp.unlink(missing_ok=True)
            why = f"ran over {CHILD_TIMEOUT_S:.0f}s" if ran > CHILD_TIMEOUT_S else f"exited {child.returncode}"
            raise RuntimeError(f"compile child {why}: {tail[-400:]}")
        if tmp != path:
            os.replace(tmp, path)
        self.compile_seconds[key] = time.perf_counter() - started
        prune_compiled_cache(self.cache_dir, self.cache_bytes, keep=path)
        logger.info("built the UNet pass %s in %.0fs (%.0fs of it running, paused while serving)",
                    key.name(), self.compile_seconds[key], ran)

    def note_busy(self) -> None:
        """The worker is at work (a request being encoded, stepped or decoded): the compile child pauses."""
        self._last_busy = time.monotonic()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """The child stays paused for the whole block, however long (an SD 2.1 512² UNet call at batch 4 takes
        over 10 s: a mark at its start alone let the child resume 2 s into it and slow it, measured)."""
        with self._lock:
            self._active += 1
        self._last_busy = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
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
            busy = self._active > 0 or now - self._last_busy < PAUSE_AFTER_BUSY_S
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


def _package_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _stale_temp(path: Path) -> bool:
    """A temp file/folder of a build whose process is gone: ``.<name>.<pid>.tmp.pt2`` or ``.<name>.<pid>.tmp``."""
    if not path.name.startswith("."):
        return False
    stem = path.name.removesuffix(".pt2")
    if not stem.endswith(".tmp"):
        return False
    pid = stem.removesuffix(".tmp").rsplit(".", 1)[-1]
    return pid.isdigit() and not pid_alive(int(pid))


def prune_compiled_cache(cache_dir: Path, max_bytes: int, *, keep: Path | None = None) -> list[Path]:
    """Bound the compiled-step cache: remove least recently used packages until it fits in ``max_bytes``.

    Packages are AOTInductor ``.pt2`` files and OpenVINO ``.ov`` folders. Also removes temp files and folders
    of builds whose process is gone (a worker killed mid-compile leaves its ``.<name>.<pid>.tmp.pt2``, an
    OpenVINO child its ``.<name>.ov.<pid>.tmp``). ``keep`` (the package just built) is never removed, nor is a
    package whose build lock another process holds. ``max_bytes`` 0 means no bound. Returns what was removed.
    """
    root = Path(cache_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    packages: list[tuple[float, int, Path]] = []
    candidates = [*root.rglob("*.pt2"), *(p for p in root.rglob("*.ov") if p.is_dir()),
                  *(p for p in root.rglob(".*.tmp") if p.is_dir())]
    for path in candidates:
        try:
            if path.name.startswith("."):
                if _stale_temp(path):
                    _remove(path)
                    removed.append(path)
                continue
            packages.append((path.stat().st_mtime, _package_bytes(path), path))
        except OSError:
            continue
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
            _remove(path)
            removed.append(path)
            total -= size
            logger.info("compiled-step cache over %.1f GB: removed %s (least recently used)", max_bytes / 1e9, path)
    return removed


def enable_compiled_steps(model: LoadedModel, mode: str, cache_dir: Path, *, max_sizes: int = 2,
                          cache_bytes: int = DEFAULT_CACHE_BYTES, engine: str = "torch",
                          build: bool = True, static_batches: int = 1) -> StepCompiler | None:
    """Attach a :class:`StepCompiler` to ``model`` when :func:`compile_decision` says so; returns it.

    ``engine`` (``SDMAKER_ENGINE``) picks the backend (:func:`engine_decision`). ``openvino`` named explicitly
    builds for any model on the CPU unless ``mode`` is ``off``: whoever names an engine wants it used.
    ``build=False`` (``sdmaker generate``): use the passes a serving worker already built for this model, size
    and machine, never build (a one-shot run would not earn the minutes back). ``static_batches``
    (``SDMAKER_OPENVINO_STATIC``): how many batch sizes the OpenVINO engine gives a static-shape copy of a pass.
    """
    backend, engine_why = engine_decision(engine)
    on, why = compile_decision(model, mode)
    if engine == "openvino" and mode == "auto" and not on:
        on, why = compile_decision(model, "on")  # off only off the CPU
        why = "SDMAKER_ENGINE=openvino named explicitly" if on else why
    logger.info("compiled UNet steps for %s: %s (%s; backend %s: %s)", model.name, "on" if on else "off", why,
                backend, engine_why)
    if not on:
        model.step_compiler = None
        return None
    compiler = StepCompiler(model, Path(cache_dir), max_sizes=max_sizes, cache_bytes=cache_bytes, backend=backend,
                            build=build, static_batches=static_batches)
    model.step_compiler = compiler
    return compiler
