"""Engine: loading SD1/SD2/MiniLM folders, every scheduler, reproducibility, recipes, pickle refusal."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdmaker.engine import generate, load_model, read_recipe, recommended_dtype
from sdmaker.errors import ConfigError, ModelFormatError, ModelNotFoundError, PickleRefusedError
from sdmaker.schema import SCHEDULERS, GenerateRequest

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}


def _pixels(result, i: int = 0) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(result.images[i].image)


@pytest.mark.parametrize("fixture", ["sd1_dir", "sd2_dir", "minilm_dir"])
def test_loads_each_architecture(fixture: str, request: pytest.FixtureRequest) -> None:
    model = load_model(request.getfixturevalue(fixture))
    info = model.describe()
    expected = {"sd1_dir": ("epsilon", "CLIPTextModel"), "sd2_dir": ("v_prediction", "CLIPTextModel"),
                "minilm_dir": ("epsilon", "BertModel")}[fixture]
    assert (info["prediction_type"], info["text_encoder"]) == expected
    # auto = the measured choice: bf16 where the CPU has native bf16, else fp32
    assert info["device"] == "cpu" and info["dtype"] == recommended_dtype("cpu")
    result = generate(model, GenerateRequest(prompt="a red circle", seed=0, **SMALL))
    assert result.images[0].image.size == (64, 64)


def test_latent_schedulers_never_clip_to_pixel_range() -> None:
    """DDIM/DDPM built from a config without clip_sample (e.g. DPM-Solver's) must not clip latents to [-1, 1]."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from sdmaker.engine import make_scheduler

    dpm = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    for name in ("ddim", "ddpm"):
        assert make_scheduler(name, dpm).config.clip_sample is False
    own = DDIMScheduler(clip_sample=True).config  # a model that asks for clipping keeps it
    assert make_scheduler("ddim", own).config.clip_sample is True


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_generates(sd1_model, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    result = generate(sd1_model, GenerateRequest(prompt="a cat", seed=1, scheduler=scheduler, **SMALL))
    assert result.scheduler == scheduler
    assert np.isfinite(_pixels(result)).all()


def test_same_seed_gives_bit_identical_images(sd1_model) -> None:  # type: ignore[no-untyped-def]
    req = GenerateRequest(prompt=["a cat", "a dog"], num_images_per_prompt=2, seed=42, scheduler="euler_a", **SMALL)
    a, b = generate(sd1_model, req), generate(sd1_model, req)
    assert a.seeds == b.seeds == [42, 43, 44, 45]
    for i in range(4):
        assert np.array_equal(_pixels(a, i), _pixels(b, i))
        assert a.encode(i) == b.encode(i)
    other = generate(sd1_model, req.model_copy(update={"seed": 7}))
    assert not np.array_equal(_pixels(a, 0), _pixels(other, 0))


def test_each_image_regenerates_alone_from_its_seed(sd1_model) -> None:  # type: ignore[no-untyped-def]
    batch = generate(sd1_model, GenerateRequest(prompt="a cat", num_images_per_prompt=3, seed=100, **SMALL))
    alone = generate(sd1_model, GenerateRequest(prompt="a cat", seed=batch.seeds[2], **SMALL))
    diff = np.abs(_pixels(batch, 2).astype(int) - _pixels(alone, 0).astype(int))
    assert diff.max() <= 1  # same noise; batch-size-dependent float rounding may flip one 8-bit level


def test_progress_callback_sees_every_step(sd1_model) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[int, int]] = []
    generate(sd1_model, GenerateRequest(prompt="x", seed=0, height=64, width=64, num_inference_steps=3,
                                        scheduler="ddim"), on_step=lambda s, t: seen.append((s, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()  # PNDM runs one extra warm-up call: the total reported must match the calls made
    generate(sd1_model, GenerateRequest(prompt="x", seed=0, height=64, width=64, num_inference_steps=3,
                                        scheduler="pndm"), on_step=lambda s, t: seen.append((s, t)))
    assert [s for s, _ in seen] == list(range(1, len(seen) + 1))
    assert all(t == len(seen) for _, t in seen)


def test_png_recipe_round_trip_regenerates(sd1_model) -> None:  # type: ignore[no-untyped-def]
    req = GenerateRequest(prompt=["a cat", "a dog"], negative_prompt="blurry", seed=9, format="png",
                          scheduler="dpmpp_2m", **SMALL)
    result = generate(sd1_model, req)
    png = result.encode(1)
    recipe = read_recipe(png)
    assert recipe["model_digest"] == sd1_model.digest
    assert recipe["request"]["prompt"] == "a dog"
    assert recipe["request"]["negative_prompt"] == "blurry"
    assert recipe["request"]["seed"] == 10
    again = generate(sd1_model, GenerateRequest.model_validate(recipe["request"]))
    diff = np.abs(np.asarray(Image.open(io.BytesIO(png))).astype(int) - _pixels(again).astype(int))
    assert diff.max() <= 1


def test_output_formats(sd1_model) -> None:  # type: ignore[no-untyped-def]
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("png", b"\x89PNG"), ("webp", b"RIFF")):
        result = generate(sd1_model, GenerateRequest(prompt="x", seed=0, format=fmt, **SMALL))
        assert result.encode(0).startswith(magic)
        assert result.mime_type == f"image/{fmt}"


def test_model_defaults_from_sdmaker_json(sd1_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "with-defaults"
    shutil.copytree(sd1_dir, model_dir)
    (model_dir / "sdmaker.json").write_text('{"defaults": {"height": 64, "width": 64, "num_inference_steps": 2}}')
    model = load_model(model_dir)
    result = generate(model, GenerateRequest(prompt="x", seed=0))
    assert result.images[0].image.size == (64, 64)
    assert result.request.num_inference_steps == 2


def test_pickle_weights_are_refused_unless_allowed(sd1_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "pickled"
    shutil.copytree(sd1_dir, model_dir)
    for st in model_dir.rglob("*.safetensors"):
        st.rename(st.with_name(st.name.replace(".safetensors", ".bin")))
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_model(model_dir)


def test_missing_and_malformed_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="model_index.json"):
        load_model(tmp_path / "empty")


def test_fp16_on_cpu_is_refused_with_a_reason(sd1_dir: Path) -> None:
    with pytest.raises(ConfigError, match="fp16"):
        load_model(sd1_dir, device="cpu", dtype="fp16")
