"""A serving worker turns compiled steps on by SDMAKER_COMPILE, under SDMAKER_HOME, and stops them on exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdmaker.serving.container import HandlerService
from sdmaker.serving.daemon._admission import compiled_step_bytes, worker_memory_floor


def test_worker_compiles_only_when_the_setting_says(sd2_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDMAKER_HOME", str(tmp_path))
    monkeypatch.delenv("SDMAKER_COMPILE", raising=False)
    auto = HandlerService(sd2_dir, device="cpu", dtype="bf16")
    auto.load()
    assert auto.model.loaded.step_compiler is None  # auto: a tiny UNet never pays the compile back

    monkeypatch.setenv("SDMAKER_COMPILE", "on")
    monkeypatch.setenv("SDMAKER_COMPILE_CACHE_GB", "2.5")
    forced = HandlerService(sd2_dir, device="cpu", dtype="bf16")
    forced.load()
    compiler = forced.model.loaded.step_compiler
    assert compiler is not None and compiler.max_sizes == 1
    assert compiler.cache_dir == tmp_path / "cache" / "compiled"
    assert compiler.cache_bytes == 2_500_000_000
    forced.stop()
    assert compiler._closed


def test_memory_floor_counts_the_compiled_copy_of_a_big_unet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    with weights.open("wb") as f:  # sparse: 300 MB on paper, nothing on disk
        f.truncate(300 * 1000**2)
    monkeypatch.delenv("SDMAKER_COMPILE", raising=False)
    assert compiled_step_bytes(tmp_path) == 300 * 1000**2
    with_copy = worker_memory_floor(tmp_path, "bf16")
    monkeypatch.setenv("SDMAKER_COMPILE", "off")
    assert compiled_step_bytes(tmp_path) == 0
    assert with_copy - worker_memory_floor(tmp_path, "bf16") == 300 * 1000**2


def test_worker_engine_setting_picks_the_backend(sd2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    monkeypatch.setenv("SDMAKER_HOME", str(tmp_path))
    monkeypatch.delenv("SDMAKER_COMPILE", raising=False)
    monkeypatch.setenv("SDMAKER_ENGINE", "openvino")  # named: built even for a UNet auto would leave eager
    worker = HandlerService(sd2_dir, device="cpu", dtype="bf16")
    worker.load()
    compiler = worker.model.loaded.step_compiler
    assert compiler is not None and compiler.backend == "openvino"
    worker.stop()
    monkeypatch.setenv("SDMAKER_COMPILE", "on")
    monkeypatch.setenv("SDMAKER_ENGINE", "torch")
    torch_worker = HandlerService(sd2_dir, device="cpu", dtype="bf16")
    torch_worker.load()
    assert torch_worker.model.loaded.step_compiler.backend == "aoti"
    torch_worker.stop()
