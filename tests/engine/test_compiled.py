"""Compiled UNet steps: who gets them, built in a child process, cached, used per size, eager until then."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from sdmaker.engine import compile_decision, enable_compiled_steps, generate, load_model
from sdmaker.engine._compiled import prune_compiled_cache
from sdmaker.errors import ConfigError
from sdmaker.schema import GenerateRequest


def _req(**kw: object) -> GenerateRequest:
    base: dict[str, object] = {"prompt": "a blue square", "height": 64, "width": 64, "num_inference_steps": 3,
                               "seed": 11, "scheduler": "ddim"}
    base.update(kw)
    return GenerateRequest(**base)


def test_compile_decision_by_mode_size_and_precision(sd2_dir: Path) -> None:
    bf16 = load_model(sd2_dir, dtype="bf16", digest="-")
    fp32 = load_model(sd2_dir, dtype="fp32", digest="-")
    on, why = compile_decision(bf16, "auto")
    assert not on and "never pays" in why  # a tiny UNet: the compile would never pay back
    assert compile_decision(bf16, "on")[0] and compile_decision(fp32, "on")[0]
    assert not compile_decision(bf16, "off")[0]
    assert not compile_decision(fp32, "auto")[0]
    with pytest.raises(ConfigError) as err:
        compile_decision(bf16, "fast")
    assert err.value.fields["field"] == "SDMAKER_COMPILE"
    assert enable_compiled_steps(bf16, "auto", Path("/nonexistent")) is None and bf16.step_compiler is None


def _package(root: Path, model: str, name: str, size: int, age: float) -> Path:
    path = root / model / "torch-tag" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_the_compiled_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    oldest = _package(tmp_path, "a", "step-4x8x8-e7x32-bfloat16.pt2", 100, age=300)
    older = _package(tmp_path, "b", "step-4x8x8-e7x32-bfloat16.pt2", 100, age=200)
    newest = _package(tmp_path, "c", "step-4x16x16-e7x32-bfloat16.pt2", 100, age=100)
    built = _package(tmp_path, "c", "step-4x8x8-e7x32-bfloat16.pt2", 100, age=400)  # just built: mtime aside
    # a build killed with its worker leaves a temp file; one whose process lives is still being written
    dead = _package(tmp_path, "a", ".step-4x16x16-e7x32-bfloat16.999999999.tmp.pt2", 50, age=10)
    live = _package(tmp_path, "a", f".step-4x32x32-e7x32-bfloat16.{os.getpid()}.tmp.pt2", 50, age=10)

    assert prune_compiled_cache(tmp_path, 0, keep=built) == [dead]  # 0 = unbounded: only the dead temp file
    assert live.exists() and oldest.exists()

    # another process is building (or loading) the oldest one: its lock is held, so it is passed over
    with open(oldest.with_name(f".{oldest.stem}.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        removed = prune_compiled_cache(tmp_path, 300, keep=built)
    assert removed == [older]
    assert oldest.exists() and newest.exists() and built.exists()

    assert prune_compiled_cache(tmp_path, 150, keep=built) == [oldest, newest]
    assert built.exists() and live.exists()
    assert prune_compiled_cache(tmp_path / "missing", 1) == []


@pytest.mark.slow
def test_steps_compile_in_the_background_and_are_reused_by_size(sd2_dir: Path, tmp_path: Path) -> None:
    model = load_model(sd2_dir, dtype="bf16", digest="-")
    eager = generate(model, _req()).arrays
    compiler = enable_compiled_steps(model, "on", tmp_path / "compiled")
    assert compiler is not None

    # the first request of a size runs eager (bit-identical) and only schedules the compile
    first = generate(model, _req()).arrays
    assert np.array_equal(first, eager)
    # a second worker of the model on this machine, at the same time: it waits for that build, no second one
    again = load_model(sd2_dir, dtype="bf16", digest="-")
    second = enable_compiled_steps(again, "on", tmp_path / "compiled")
    assert second is not None
    generate(again, _req())
    # while the worker runs steps, the compile child (its whole process group) is stopped, then resumed
    states = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "T" not in states:
        compiler.note_busy()
        child = compiler._child
        if child is not None:
            with contextlib.suppress(FileNotFoundError, IndexError):
                states.add(Path(f"/proc/{child.pid}/stat").read_text().split(") ", 1)[1][0])
        time.sleep(0.1)
    assert "T" in states, f"the child was never paused while steps ran (states seen: {states})"
    assert compiler.wait(timeout=600), "the compile child did not finish"
    assert not compiler.failed, compiler.failed
    assert len(compiler.runners) == 1 and len(compiler.compile_seconds) == 1
    assert second.wait(timeout=120) and len(second.runners) == 1 and second.compile_seconds == {}
    package = next((tmp_path / "compiled").rglob("*.pt2"))

    calls = []
    runner = next(iter(compiler.runners.values()))
    for key in list(compiler.runners):
        compiler.runners[key] = lambda *a, _r=runner: calls.append(a[0].shape[0]) or _r(*a)  # type: ignore[misc]
    compiled = generate(model, _req()).arrays
    assert calls == [2, 2, 2]  # every CFG step of the request went through the package
    assert np.abs(compiled.astype(np.float32) - eager.astype(np.float32)).mean() < 0.02  # bf16 rounding only
    # more images per request: a bigger batch, the same package (the batch dimension is free)
    generate(model, _req(num_images_per_prompt=2))
    assert calls[3:] == [4, 4, 4] and len(compiler.runners) == 1 and not compiler.pending

    # LoRA-free requests only, and no DeepCache split passes: those stay eager
    calls.clear()
    generate(model, _req(deep_cache_interval=2, num_inference_steps=4))
    assert calls == []

    # a worker started later loads the package from the cache instead of compiling again
    later = load_model(sd2_dir, dtype="bf16", digest="-")
    third = enable_compiled_steps(later, "on", tmp_path / "compiled")
    assert third is not None
    generate(later, _req())
    assert third.wait(timeout=120) and len(third.runners) == 1 and third.compile_seconds == {}
    assert package.exists()
    third.close()
    second.close()
    compiler.close()


@pytest.mark.slow
def test_a_failed_compile_leaves_the_size_eager(sd2_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(sd2_dir, broken)
    for f in (broken / "unet").glob("*.safetensors"):  # the child reads safetensors only
        f.unlink()
    model = load_model(sd2_dir, dtype="bf16", digest="-")
    model.path = broken
    compiler = enable_compiled_steps(model, "on", tmp_path / "compiled")
    assert compiler is not None
    before = generate(model, _req()).arrays
    assert compiler.wait(timeout=300)
    assert len(compiler.failed) == 1 and not compiler.runners
    assert np.array_equal(generate(model, _req()).arrays, before)  # still served, eager
    assert not list((tmp_path / "compiled").rglob("*.pt2"))  # nothing half-written left behind


@pytest.mark.slow
def test_the_compile_child_dies_with_its_worker() -> None:
    """A worker killed with -9 leaves no compiler running for minutes (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    import time

    # a stand-in worker: starts the child with its own pid, then sleeps until killed
    code = ("import subprocess, sys, os, time, json; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time, sys; sys.argv=[0]+sys.argv[1:]; "
            "from sdmaker.engine._compile_child import _die_with; _die_with(int(sys.argv[1])); time.sleep(600)', "
            "str(os.getpid())]); print(p.pid, flush=True); time.sleep(600)")
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(worker.stdout.readline())  # type: ignore[union-attr]
    time.sleep(1.0)
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break  # a zombie: dead, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"compile child {child} outlived its worker")


def test_the_child_stays_paused_through_a_long_unet_call(sd2_dir: Path, tmp_path: Path) -> None:
    """A worker's UNet call can outlast the 2 s idle grace (SD 2.1 512² at batch 4: 10+ s): paused throughout."""
    import subprocess
    import threading

    from sdmaker.engine._compiled import PAUSE_AFTER_BUSY_S, StepCompiler

    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]

    compiler = StepCompiler(load_model(sd2_dir, dtype="fp32", digest="-"), tmp_path)
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)  # stands in for the compile child
    supervisor = threading.Thread(target=compiler._supervise, args=(child,), daemon=True)
    supervisor.start()
    try:
        with compiler.working():
            time.sleep(PAUSE_AFTER_BUSY_S + 1.0)
            assert state(child.pid) == "T"  # still stopped, past the grace a single mark would give
        time.sleep(PAUSE_AFTER_BUSY_S + 1.0)
        assert state(child.pid) == "S"  # idle again: resumed
    finally:
        compiler.close()
        child.kill()
        child.wait()
        supervisor.join(timeout=5)
