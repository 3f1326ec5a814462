"""The OpenVINO engine: its passes equal torch's, it serves DeepCache's passes and plain steps, and it is chosen
only where the setting and the machine say so."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdmaker.engine import enable_compiled_steps, engine_decision, generate, generate_fast, load_model
from sdmaker.engine._compiled import prune_compiled_cache
from sdmaker.engine._deepcache import UNetUnits
from sdmaker.errors import ConfigError
from sdmaker.schema import GenerateRequest

openvino = pytest.importorskip("openvino")


def _req(**kw: object) -> GenerateRequest:
    base: dict[str, object] = {"prompt": "a blue square", "height": 64, "width": 64, "num_inference_steps": 4,
                               "seed": 5, "scheduler": "ddim"}
    base.update(kw)
    return GenerateRequest(**base)


def test_engine_decision_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import sdmaker.engine._compiled as compiled
    import sdmaker.engine._openvino as ov_module

    assert engine_decision("torch")[0] == "aoti"
    assert engine_decision("openvino")[0] == "openvino"
    with pytest.raises(ConfigError) as err:
        engine_decision("tensorrt")
    assert err.value.fields["field"] == "SDMAKER_ENGINE"
    # auto: OpenVINO on the CPU classes where it was measured to win end to end (AVX512-BF16, AMX or not)
    monkeypatch.setattr(compiled, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16"])
    assert engine_decision("auto") == ("openvino", engine_decision("auto")[1])
    assert "without AMX" in engine_decision("auto")[1]
    monkeypatch.setattr(compiled, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"])
    backend, why = engine_decision("auto")
    assert backend == "openvino" and "with AMX" in why
    monkeypatch.setattr(compiled, "cpu_flags", lambda: ["avx2"])
    backend, why = engine_decision("auto")
    assert backend == "aoti" and "avx512_bf16" in why
    monkeypatch.setattr(ov_module, "openvino_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install openvino") as err:
        engine_decision("openvino")
    assert err.value.fields["field"] == "SDMAKER_ENGINE"
    monkeypatch.setattr(compiled, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16"])
    assert engine_decision("auto")[0] == "aoti"  # not installed: auto falls back, never fails


def test_both_passes_equal_the_torch_units_in_fp32(sd2_dir: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from sdmaker.engine._openvino import OpenVinoRunner, convert_unet_pass

    unet = UNet2DConditionModel.from_pretrained(sd2_dir / "unet").eval().requires_grad_(False)
    units = UNetUnits(unet)
    branch = 1
    full_dir = convert_unet_pass(unet, kind="full", branch=branch, height=8, width=8, seq=77, out=tmp_path / "f.ov",
                                 fp16_weights=False)
    shallow_dir = convert_unet_pass(unet, kind="shallow", branch=branch, height=8, width=8, seq=77,
                                    out=tmp_path / "s.ov", fp16_weights=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.ov", "s.ov"]  # no temp folder left behind
    full = OpenVinoRunner(full_dir, precision="f32")
    shallow = OpenVinoRunner(shallow_dir, precision="f32")
    gen = torch.Generator().manual_seed(0)
    for batch in (2, 6):  # the batch dimension is free: step batching's sizes share one export
        sample = torch.randn(batch, 4, 8, 8, generator=gen)
        t = torch.full((batch,), 601.0)
        embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
        with torch.no_grad():
            want, feature = units.forward(sample, t, embeds, branch=branch)
            want_shallow, _ = units.forward(sample, t, embeds, branch=branch, cached=feature)
        got, got_feature = full(sample, t, embeds)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-4) and torch.allclose(got_feature, feature, atol=1e-4)
        assert torch.allclose(shallow(sample, t, embeds, feature), want_shallow, atol=1e-4)
    # bf16 tensors in, bf16 out (the worker's placement), computed in OpenVINO's bf16
    bf16 = OpenVinoRunner(shallow_dir, precision="bf16")
    out = bf16(sample.bfloat16(), t, embeds.bfloat16(), feature.bfloat16())
    assert out.dtype == torch.bfloat16 and (out.float() - want_shallow).abs().mean() < 0.05


def test_a_recurring_batch_size_gets_a_static_copy_with_the_same_output(sd2_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import UNet2DConditionModel

    import sdmaker.engine._openvino as ov_module
    from sdmaker.engine._openvino import STATIC_AFTER, OpenVinoRunner, convert_unet_pass

    unet = UNet2DConditionModel.from_pretrained(sd2_dir / "unet").eval().requires_grad_(False)
    folder = convert_unet_pass(unet, kind="full", branch=1, height=8, width=8, seq=77, out=tmp_path / "f.ov",
                               fp16_weights=False)
    gen = torch.Generator().manual_seed(1)

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 4, 8, 8, generator=gen), torch.full((batch,), 401.0),
                torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen))

    runner = OpenVinoRunner(folder, precision="f32")  # one static copy, the default
    two, six = inputs(2), inputs(6)
    dynamic_two = runner(*two)
    for _ in range(STATIC_AFTER):  # a batch size that recurs...
        runner(*two)
    runner(*six)  # ... not a one-off one
    runner.wait_static(timeout=120)
    assert list(runner.static) == [2] and runner.static_seconds[2] > 0
    static_two = runner(*two)  # now through the static compile: the same graph, the same numbers
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(static_two, dynamic_two, strict=True))
    for _ in range(STATIC_AFTER):
        runner(*six)
    runner.wait_static(timeout=120)
    assert list(runner.static) == [2]  # the one slot is taken: batch 6 keeps the dynamic compile
    assert runner(*six)[0].shape[0] == 6

    off = OpenVinoRunner(folder, precision="f32", static_batches=0)
    for _ in range(STATIC_AFTER + 1):
        off(*two)
    assert off.static == {} and off._building == {}

    from sdmaker.config import load_settings

    assert load_settings({}).openvino_static == 1 and load_settings({"SDMAKER_OPENVINO_STATIC": "0"}).openvino_static == 0
    with pytest.raises(ConfigError, match="SDMAKER_OPENVINO_STATIC"):
        load_settings({"SDMAKER_OPENVINO_STATIC": "-1"})

    monkeypatch.setattr(ov_module, "available_memory_bytes", lambda: 1000)  # a machine without room for a copy
    tight = OpenVinoRunner(folder, precision="f32")
    for _ in range(STATIC_AFTER):
        tight(*two)
    tight.wait_static(timeout=120)
    assert tight.static == {} and "free" in tight.static_skipped[2]


@pytest.mark.slow
def test_the_openvino_engine_serves_deepcache_and_plain_steps(sd2_dir: Path, tmp_path: Path) -> None:
    model = load_model(sd2_dir, dtype="fp32", digest="-")
    deep = _req(deep_cache_interval=2)
    eager_deep = generate(model, deep).arrays
    eager_plain = generate(model, _req()).arrays
    compiler = enable_compiled_steps(model, "auto", tmp_path / "compiled", engine="openvino")
    assert compiler is not None and compiler.backend == "openvino"  # named explicitly: built even for a tiny UNet

    # the first request runs eager, bit for bit, and schedules both passes of its size
    assert np.array_equal(generate(model, deep).arrays, eager_deep)
    assert compiler.wait(timeout=300) and not compiler.failed, compiler.failed
    assert sorted(k.kind for k in compiler.runners) == ["full", "shallow"]
    assert {k.branch for k in compiler.runners} == {2}  # the loop's default branch: plain steps share the export

    calls: list[str] = []
    for key, runner in list(compiler.runners.items()):
        compiler.runners[key] = lambda *a, _r=runner, _k=key.kind: calls.append(_k) or _r(*a)  # type: ignore[misc]
    served = generate(model, deep).arrays
    assert calls == ["full", "shallow", "full", "shallow"]  # every UNet call of the request went through OpenVINO
    assert np.abs(served.astype(np.float32) - eager_deep.astype(np.float32)).max() <= 2  # of 255: float error only
    calls.clear()
    plain = generate(model, _req()).arrays
    assert calls == ["full"] * 4  # a plain CFG step takes the full pass and drops the feature
    assert np.abs(plain.astype(np.float32) - eager_plain.astype(np.float32)).max() <= 2
    calls.clear()
    generate(model, _req(num_images_per_prompt=3, deep_cache_interval=2))  # batch 6: the same exports
    assert calls == ["full", "shallow", "full", "shallow"] and len(compiler.runners) == 2 and not compiler.pending

    # another DeepCache branch at this size: its shallow pass (small) is built, but its full pass would be a
    # second copy of the weights, so those steps stay eager
    generate_fast(model, deep, deep_cache_branch=1)
    assert compiler.wait(timeout=300) and not compiler.failed, compiler.failed
    assert sorted((k.kind, k.branch) for k in compiler.runners) == [("full", 2), ("shallow", 1), ("shallow", 2)]

    # a worker started later loads the IR from the cache instead of converting again
    later = load_model(sd2_dir, dtype="fp32", digest="-")
    again = enable_compiled_steps(later, "on", tmp_path / "compiled", engine="openvino")
    assert again is not None
    generate(later, deep)
    assert again.wait(timeout=120) and len(again.runners) == 2 and again.compile_seconds == {}
    assert len(list((tmp_path / "compiled").rglob("model.xml"))) == 3
    again.close()
    compiler.close()

    # a one-shot run (sdmaker generate) uses what is in the cache and never builds
    oneshot = load_model(sd2_dir, dtype="fp32", digest="-")
    reader = enable_compiled_steps(oneshot, "on", tmp_path / "compiled", engine="openvino", build=False)
    assert reader is not None
    generate(oneshot, deep)
    assert reader.wait(timeout=120) and len(reader.runners) == 2 and reader.compile_seconds == {}
    bigger = generate(oneshot, _req(height=128, width=128, deep_cache_interval=2))  # a size nobody built
    assert bigger.images and reader.wait(timeout=60)
    assert all("not in the cache" in why for why in reader.failed.values()) and len(reader.failed) == 2
    assert len(list((tmp_path / "compiled").rglob("model.xml"))) == 3  # nothing was built
    reader.close()


def test_the_cache_bound_counts_openvino_folders_and_removes_dead_temp_folders(tmp_path: Path) -> None:
    def folder(name: str, size: int, age: float) -> Path:
        path = tmp_path / "m" / "tag" / name
        path.mkdir(parents=True)
        (path / "model.bin").write_bytes(b"x" * size)
        (path / "model.xml").write_bytes(b"<net/>")
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
        return path

    old = folder("ov-full2-4x8x8-e77x32-float32.ov", 100, age=300)
    new = folder("ov-shallow2-4x8x8-e77x32-float32.ov", 100, age=100)
    dead = folder(".ov-full2-4x16x16-e77x32-float32.ov.999999999.tmp", 50, age=10)
    live = folder(f".ov-full2-4x32x32-e77x32-float32.ov.{os.getpid()}.tmp", 50, age=10)
    assert prune_compiled_cache(tmp_path, 0) == [dead]
    assert prune_compiled_cache(tmp_path, 150) == [old]  # 106 + 106 bytes > 150: the least recently used goes
    assert new.exists() and live.exists() and not old.exists()
