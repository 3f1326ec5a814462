"""LoRA training (issue 16): PEFT adapter on the frozen built-in UNet, diffusers layout, exact resume, MLflow;
the opt-in heart/pink concept; the held-out paraphrase prompt set."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sdmaker.cli import app
from sdmaker.cli._common import run_app
from sdmaker.config import load_settings
from sdmaker.files import weights_digest
from sdmaker.store import resolve_model
from sdmaker.training._config import load_config, prepare_lora
from sdmaker.training._trainer import LORA_FILE, train

ROOT = Path(__file__).resolve().parents[2]
LORA_CONFIG = ROOT / "configs" / "train" / "lora-heart-pink.json"


def _quick_cfg(**overrides: object) -> dict:
    from sdmaker.models import builtin_dir

    cfg = load_config(LORA_CONFIG, quick=True, overrides=dict(overrides))
    return prepare_lora(cfg, builtin_dir("mini"), "test-base-digest")


def test_quick_lora_trains_only_the_adapter_and_resumes_exactly(tmp_path: Path, checkpoint_tensors: Any) -> None:
    cfg = _quick_cfg()
    straight = train(cfg, tmp_path / "straight")
    assert straight.status == "finished" and straight.model_dir is not None
    stopped = train(cfg, tmp_path / "resumed", stop_after=2)
    assert stopped.status == "stopped" and stopped.steps_done == 2
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert resumed.steps_done == cfg["steps"]
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # only adapter weights are trained and checkpointed, not the frozen base UNet
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if ".lora_B." in k)  # B left its zero init
    # diffusers' LoRA layout, which load_lora_weights reads
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    weights = straight.model_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(re.fullmatch(r"unet\..+\.lora_[AB]\.weight", k) for k in keys)
    assert meta["unet.r"] == cfg["lora"]["rank"] and sorted(meta["unet.target_modules"]) == sorted(
        cfg["lora"]["target_modules"])
    state, _ = StableDiffusionPipeline.lora_state_dict(str(straight.model_dir))
    assert set(state) == set(keys)
    facts = json.loads((straight.model_dir / LORA_FILE).read_text())
    assert facts["base_digest"] == "test-base-digest" and facts["extra_shapes"] == ["heart"]
    assert facts["base_weights_digest"] == weights_digest(cfg["base_path"])  # what serving compares, not the card


def test_train_lora_cli_resolves_the_base_and_tracks_in_mlflow(tmp_path: Path, sdmaker_home: Path) -> None:
    out = tmp_path / "lora"
    assert run_app(app, ["train", "lora", "--config", str(LORA_CONFIG), "--quick", "--out", str(out)]) == 0
    facts = json.loads((out / "model" / LORA_FILE).read_text())
    assert facts["base"] == "mini" and len(facts["base_digest"]) == 64
    mini = resolve_model("mini", load_settings())
    assert (facts["base_digest"], facts["base_weights_digest"]) == (mini.digest, mini.weights_digest)
    runs = list((sdmaker_home / "mlruns").glob("*/*/metrics/loss"))
    assert runs, "no MLflow loss curve"
    assert run_app(app, ["train", "lora", "--config", str(ROOT / "configs" / "train" / "mini-vae.json"),
                         "--quick", "--out", str(tmp_path / "x")]) == 1  # not a lora config


def test_lora_config_errors_name_the_field(tmp_path: Path) -> None:
    from sdmaker.errors import ConfigError

    bad = tmp_path / "bad.json"
    for body, field in (({"kind": "lora"}, "base"),
                        ({"kind": "lora", "base": "mini", "lora": {"rank": 0}}, "lora.rank"),
                        ({"kind": "lora", "base": "mini", "lora": {"target_modules": ["conv1"]}}, "lora.target_modules"),
                        ({"kind": "lora", "base": "mini", "data": {"extra_shapes": ["hexagon"]}}, "data.extra_shapes"),
                        ({"kind": "lora", "base": "mini", "data": {"fit_latents": {"colors": ["mauve"], "iters": 5,
                                                                                   "lr": 0.1}}},
                         "data.fit_latents.colors"),
                        ({"kind": "lora", "base": "mini", "data": {"fit_latents": {"colors": ["pink"], "iters": 0,
                                                                                   "lr": 0.1}}},
                         "data.fit_latents.iters"),
                        ({"kind": "lora", "base": "mini", "pixel_loss": {"weight": 1, "max_timestep": 0}},
                         "pixel_loss.max_timestep"),
                        ({"kind": "lora", "base": "mini", "pixel_loss": {"weight": 1, "max_timestep": 500,
                                                                         "colour": 2}}, "pixel_loss"),
                        ({"kind": "vae", "pixel_loss": {"weight": 1, "max_timestep": 500}}, "pixel_loss"),
                        ({"kind": "lora", "base": "mini", "preserve_weight": -1}, "preserve_weight"),
                        ({"kind": "lora", "base": "mini", "preserve_weight": "high"}, "preserve_weight"),
                        ({"kind": "unet", "vae": "v", "preserve_weight": 1.0}, "preserve_weight")):
        bad.write_text(json.dumps(body))
        with pytest.raises(ConfigError) as err:
            load_config(bad)
        assert field in str(err.value)


def test_concept_is_opt_in_and_the_analyser_knows_it() -> None:
    from sdmaker.training._analyser import analyse
    from sdmaker.training._data import _samples
    from sdmaker.training._eval import EvalItem, eval_prompts, score_item
    from sdmaker.training._scenes import render, sample_concept_scene, scene_rng

    base = load_config(ROOT / "configs" / "train" / "mini-unet.json", quick=True)
    words = {w for s in range(20) for _, text, _ in _samples(base, s) for w in text.split()}
    words |= {w for it in eval_prompts(128) for w in it.prompt.split()}
    assert not words & {"heart", "pink"}  # the base model's data and eval never show the concept
    concept = {w for s in range(20) for _, text, _ in _samples({**base, "data": {
        **base["data"], "extra_shapes": ["heart"], "extra_colors": ["pink"], "concept_prob": 0.6}}, s)
        for w in text.split()}
    assert {"heart", "pink"} <= concept
    right = 0
    for i in range(60):
        scene = sample_concept_scene(scene_rng(3, i), extra_shapes=("heart",), extra_colors=("pink",),
                                     two_shape_prob=0.4)
        assert scene.background == "pink" or any(s.shape == "heart" or s.color == "pink" for s in scene.shapes)
        right += score_item(EvalItem("", scene, "x"), analyse(render(scene)))["all"]
    assert right / 60 >= 0.97
    items = eval_prompts(32, prompt_set="concept")
    assert all("heart" in it.prompt or "pink" in it.prompt for it in items)


def test_concept_eval_says_which_new_word_failed() -> None:
    """The concept set's report breaks "drawn right" down by what each prompt asks of the new words, so a
    failing adapter shows whether the shape or the colour (as a shape, or as a background) is the problem."""
    from sdmaker.training._eval import concept_kinds, eval_prompts, summarise

    items = eval_prompts(128, prompt_set="concept")
    kinds = [concept_kinds(it.scene) for it in items]
    assert all(kinds) and all(set(k) <= {"new_shape", "new_color_shape", "new_color_background"} for k in kinds)
    scores = [{"drawn": "new_color_background" not in k, "all": "new_color_background" not in k, "color": True}
              for k in kinds]
    _, groups = summarise(items, scores)
    for kind in ("new_shape", "new_color_shape", "new_color_background"):
        assert groups[kind]["n"] == sum(kind in k for k in kinds) > 0
    assert groups["new_color_background"]["drawn"] == 0.0
    only_shape = [s for k, s in zip(kinds, scores, strict=True) if k == ["new_shape"]]
    assert only_shape and all(s["drawn"] for s in only_shape)
    base = eval_prompts(16)
    assert not any(concept_kinds(it.scene) for it in base)
    assert not {"new_shape", "new_color_shape", "new_color_background"} & set(
        summarise(base, [{"drawn": True, "color": True}] * len(base))[1])


def test_minis_vae_keeps_pink_and_latents_fitted_to_the_decoder_get_closer_to_the_pixels() -> None:
    """The adapter's training targets for pink scenes: mini's encoder maps pink to latents its decoder renders
    pale; latents refined against the frozen decoder keep it, the same way on every call (exact resume)."""
    from diffusers import AutoencoderKL

    from sdmaker.models import builtin_dir, is_builtin_ready
    from sdmaker.training._analyser import analyse
    from sdmaker.training._data import _has_color, fit_latents, image_to_tensor
    from sdmaker.training._scenes import render, sample_concept_scene, scene_rng

    if not is_builtin_ready("mini"):
        pytest.skip("mini's weights are not committed")
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(builtin_dir("mini") / "vae").eval().requires_grad_(False)
    scenes = [sample_concept_scene(scene_rng(777, i), extra_shapes=("heart",), extra_colors=("pink",))
              for i in range(40)]
    pink = [s for s in scenes if any(shape.color == "pink" for shape in s.shapes)][:12]
    assert all(_has_color(s, ["pink"]) for s in pink)
    images = torch.stack([image_to_tensor(render(s)) for s in pink])
    with torch.no_grad():
        encoded = vae.encode(images).latent_dist.mean
    fitted = fit_latents(vae, encoded, images, iters=10, lr=0.2, shape_weight=9)
    assert torch.equal(fitted, fit_latents(vae, encoded, images, iters=10, lr=0.2, shape_weight=9))

    def pink_kept(latents: torch.Tensor) -> int:
        with torch.no_grad():
            pixels = ((vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        return sum("pink" in [d.color for d in analyse(row.numpy()).shapes] for row in pixels)

    def error(latents: torch.Tensor) -> float:
        with torch.no_grad():
            return float((vae.decode(latents).sample - images).abs().mean())

    # mini's VAE is trained on random colours, so its encoder keeps pink (its first VAE kept 14 of 32, and the
    # LoRA recipe then had to fit latents to the decoder); the fit still moves latents towards the pixels
    kept_encoded, kept_fitted = pink_kept(encoded), pink_kept(fitted)
    assert kept_encoded >= 11 and kept_fitted >= 11, (kept_encoded, kept_fitted)
    assert error(fitted) < error(encoded)


def test_paraphrase_set_is_held_out_but_its_words_are_trained() -> None:
    from sdmaker.training import _captions as C
    from sdmaker.training._eval import eval_prompts
    from sdmaker.training._scenes import sample_scene, scene_rng

    train = set()
    for i in range(6000):
        rng = scene_rng(1, i)
        scene = sample_scene(rng, two_shape_prob=0.5)
        train.add(C.caption(scene, rng, split="train", style="wide"))
        train.add(C.caption(scene, rng, split="train"))
    items = eval_prompts(128, prompt_set="paraphrase")
    assert {it.group for it in items} == {"para_one", "para_two"}
    assert not {it.prompt for it in items} & train
    held = [p for v in (*C._PARA_POSITION.values(), *C._PARA_RELATION.values()) for p in v]
    joined = "\n".join(train)
    for phrase in held:
        assert not re.search(rf"\b{re.escape(phrase)}\b", joined), phrase
    vocab = set(re.findall(r"[a-z-]+", joined))
    assert {w for it in items for w in re.findall(r"[a-z-]+", it.prompt)} <= vocab


def test_predicted_x0_inverts_the_noising_for_both_prediction_types() -> None:
    from sdmaker.training._models import build_scheduler
    from sdmaker.training._trainer import predicted_x0

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 600, 999])
    for prediction_type in ("v_prediction", "epsilon"):
        sched = build_scheduler("ddpm", prediction_type)
        noisy = sched.add_noise(x0, noise, t)
        pred = sched.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
        got = predicted_x0(noisy, pred, sched.alphas_cumprod[t], prediction_type == "v_prediction")
        assert torch.allclose(got, x0, atol=1e-3 if prediction_type == "epsilon" else 1e-5), prediction_type


def test_pixel_loss_trains_through_the_frozen_decoder_and_resumes_exactly(tmp_path: Path,
                                                                          checkpoint_tensors: Any) -> None:
    """The pixel loss adds a decoded-x0 term (the adapter gets its gradient through the frozen decoder) and
    leaves training exactly resumable; configs without it keep their digests (older checkpoints resume)."""
    cfg = _quick_cfg(pixel_loss={"weight": 1.0, "max_timestep": 1000, "shape_weight": 9})
    _optional_key_resumes_exactly_and_moves_the_adapter(cfg, {**cfg, "pixel_loss": None}, "pixel_loss", tmp_path,
                                                        checkpoint_tensors)


def test_preservation_holds_ordinary_scenes_to_the_frozen_base_and_resumes_exactly(tmp_path: Path,
                                                                                     checkpoint_tensors: Any) -> None:
    """``preserve_weight`` adds, on the ordinary rows only (not concept scenes with their caption), the squared
    difference between the adapted prediction and the frozen base's: zero while the adapter is at its init (B = 0), positive once it
    moved, with gradients reaching only the adapter; a run with it resumes exactly and ends elsewhere than one
    without it; configs without the key keep their digests."""
    from sdmaker.engine import minilm_dir
    from sdmaker.training._data import UnetBatches
    from sdmaker.training._trainer import _Run

    cfg = _quick_cfg(preserve_weight=1.0, data={"concept_prob": 0.5})
    batches = UnetBatches(cfg, minilm_dir())
    step, batch = next((i, b) for i in range(50) if 0 < int((b := batches[i])["concept"].sum()) < len(b["concept"]))
    run = _Run(cfg)
    _, extra = run.loss(batch, step)
    assert extra["preserve_mse"] < 1e-10  # the adapter starts as the identity: nothing drifted yet
    with torch.no_grad():  # move the adapter: the ordinary rows now drift from the base
        for name, p in run.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    loss, extra = run.loss(batch, step)
    assert extra["preserve_mse"] > 1e-6
    loss.backward()
    grads = {n for n, p in run.model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(p.requires_grad for n, p in run.model.named_parameters() if ".lora_" in n)  # switched back on
    _optional_key_resumes_exactly_and_moves_the_adapter(cfg, {**cfg, "preserve_weight": 0.0}, "preserve_weight",
                                                        tmp_path, checkpoint_tensors)


def _optional_key_resumes_exactly_and_moves_the_adapter(cfg: dict, plain: dict, key: str, tmp_path: Path,
                                                        checkpoint_tensors: Any) -> None:
    """``cfg`` (with ``key`` on) changes the digest, resumes bit-exactly after a stop, and ends with other adapter
    weights than ``plain`` (``key`` off), whose digest equals that of a config without the key at all."""
    from sdmaker.training._config import config_digest

    assert config_digest(plain) != config_digest(cfg)
    assert config_digest(plain) == config_digest({k: v for k, v in plain.items() if k != key})
    straight = train(cfg, tmp_path / "straight")
    assert straight.status == "finished"
    train(cfg, tmp_path / "resumed", stop_after=2)
    train(cfg, tmp_path / "resumed", resume=True)
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    without = train(plain, tmp_path / "plain")
    assert without.status == "finished"
    c = checkpoint_tensors(tmp_path / "plain")
    assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_B." in k)  # the term moved the adapter
