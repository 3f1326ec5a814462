"""Speed options and DeepCache: the unit view equals the UNet, options apply and can be undone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdmaker.engine import SpeedOptions, apply_speed_options, generate, generate_fast, load_model, recommended_dtype
from sdmaker.engine._deepcache import UNetUnits
from sdmaker.errors import ConfigError
from sdmaker.schema import GenerateRequest


@pytest.fixture(scope="module")
def model(sd2_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(sd2_dir, dtype="fp32")


def _req(**kw: object) -> GenerateRequest:
    base: dict[str, object] = {"prompt": "a blue square", "height": 64, "width": 64, "num_inference_steps": 6,
                               "seed": 7, "scheduler": "ddim"}
    base.update(kw)
    return GenerateRequest(**base)


@pytest.mark.parametrize("size", [(8, 8), (9, 10)])
def test_unit_view_full_pass_equals_unet(model, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    unet = model.pipeline.unet
    units = UNetUnits(unet)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, *size, generator=gen)
    t = torch.tensor([999.0, 500.0, 3.0])
    embeds = torch.randn(3, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.inference_mode():
        ref = unet(sample, t, encoder_hidden_states=embeds, return_dict=False)[0]
        for branch in range(1, units.units):
            out, feature = units.forward(sample, t, embeds, branch=branch)
            assert torch.equal(out, ref)
            again, _ = units.forward(sample, t, embeds, branch=branch, cached=feature)
            assert torch.allclose(again, ref, atol=1e-5)  # same inputs + own cache = same output


def test_deepcache_skips_full_unet_calls(model) -> None:  # type: ignore[no-untyped-def]
    req = _req().resolve(model.defaults)
    plain = generate_fast(model, req)
    cached = generate_fast(model, req, deep_cache_interval=3)
    assert plain.timings["unet_full_calls"] == 6
    assert cached.timings["unet_full_calls"] == 2  # steps 0 and 3
    assert cached.arrays.shape == plain.arrays.shape  # type: ignore[attr-defined]
    assert not np.array_equal(cached.arrays, plain.arrays)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError):
        generate_fast(model, req, deep_cache_interval=2, deep_cache_branch=99)


def test_deep_cache_is_a_request_field_with_model_defaults(model) -> None:  # type: ignore[no-untyped-def]
    """generate() honours deep_cache_interval from the request, else from the model's defaults; 0 turns it off."""
    from sdmaker.engine import StepBatcher
    from sdmaker.errors import InvalidRequestError
    from sdmaker.schema import parse_request

    explicit = generate_fast(model, _req().resolve(model.defaults), deep_cache_interval=3)
    via_request = generate(model, _req(deep_cache_interval=3))
    assert via_request.timings["unet_full_calls"] == 2
    assert np.array_equal(via_request.arrays, explicit.arrays)  # type: ignore[attr-defined]
    assert via_request.request.deep_cache_interval == 3  # recorded in the recipe
    saved = dict(model.defaults)
    try:
        model.defaults["deep_cache_interval"] = 3
        assert generate(model, _req()).timings["unet_full_calls"] == 2
        off = generate(model, _req(deep_cache_interval=0))
        assert off.timings["unet_full_calls"] == 6  # every step ran the whole UNet
        with StepBatcher(model, max_batch=4) as batcher:  # per request inside a batch, too
            a = batcher.submit_async(_req())
            b = batcher.submit_async(_req(deep_cache_interval=1, seed=8))
            assert a.result().timings["unet_full_calls"] == 2 and b.result().timings["unet_full_calls"] == 6
    finally:
        model.defaults.clear()
        model.defaults.update(saved)
    with pytest.raises(InvalidRequestError, match="deep_cache_interval"):
        parse_request({"prompt": "x", "deep_cache_interval": 11})


def test_unsupported_deep_cache_request_fails_alone_in_the_batcher(model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A request asking for DeepCache on a UNet it cannot cut is refused at submit; the batch keeps serving."""
    import sdmaker.engine._loop as loop
    from sdmaker.engine import StepBatcher
    from sdmaker.errors import InvalidRequestError

    def unsupported(unet: object) -> None:
        raise ConfigError("deep_cache supports SD 1.x/2.x UNets only", field="deep_cache")

    monkeypatch.setattr(loop, "check_deepcache_support", unsupported)
    with StepBatcher(model, max_batch=4) as batcher:
        good = batcher.submit_async(_req(num_inference_steps=2))
        with pytest.raises(InvalidRequestError, match="deep_cache_interval=2"):
            batcher.submit_async(_req(deep_cache_interval=2))
        assert len(good.result().images) == 1


def test_model_card_defaults_carry_deep_cache(tmp_path: Path) -> None:
    import json

    from sdmaker.engine._loader import read_model_defaults

    (tmp_path / "sdmaker.json").write_text(json.dumps({"defaults": {"deep_cache_interval": 2, "bogus": 1}}))
    assert read_model_defaults(tmp_path) == {"deep_cache_interval": 2}


def test_speed_options_apply_and_revert(sd2_dir: Path) -> None:
    m = load_model(sd2_dir, dtype="fp32")
    req = _req(num_inference_steps=2).resolve(m.defaults)
    ref = generate(m, req)
    apply_speed_options(m, SpeedOptions(sdpa=False, channels_last=True))
    classic = generate(m, req)
    processors = {type(p).__name__ for p in m.pipeline.unet.attn_processors.values()}
    assert processors == {"AttnProcessor"}
    apply_speed_options(m, SpeedOptions())
    back = generate(m, req)
    assert {type(p).__name__ for p in m.pipeline.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    a, b, c = (np.asarray(r.images[0].image, dtype=np.int16) for r in (ref, classic, back))
    assert np.abs(a - b).max() <= 2 and np.array_equal(a, c)


def test_bf16_load_generates(sd2_dir: Path) -> None:
    m = load_model(sd2_dir, dtype="bf16")
    assert m.pipeline.unet.dtype == torch.bfloat16
    out = generate_fast(m, _req(num_inference_steps=2))
    assert out.images[0].image.size == (64, 64)
    assert recommended_dtype("cuda") == "fp16"
    assert recommended_dtype("cpu") in ("bf16", "fp32")
