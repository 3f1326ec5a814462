"""Training: quick recipes run, kill -9 + --resume ends bit-identical, NaN stops cleanly, MLflow logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from sdmaker.training._config import load_config
from sdmaker.training._trainer import CHECKPOINT_FILE, train

ROOT = Path(__file__).resolve().parents[2]
VAE_CONFIG = ROOT / "configs" / "train" / "mini-vae.json"
UNET_CONFIG = ROOT / "configs" / "train" / "mini-unet.json"

# Runs train() and SIGKILLs its own process right after `kill_at` steps: a real `kill -9` at a known point
# (after the checkpoint of step 4, before the one of step 6), with no timing involved.
_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from sdmaker.training._config import load_config
    from sdmaker.training._trainer import train
    cfg = load_config(Path(sys.argv[1]), quick=True, overrides={"steps": 8, "checkpoint_every": 2,
                      "vae": sys.argv[4] if len(sys.argv) > 4 else None})
    kill_at = int(sys.argv[3])
    def on_step(step, total, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(cfg, Path(sys.argv[2]), progress=on_step)
""")


def _kill_and_resume(tmp_path: Path, config: Path, vae: Path | None, checkpoint_tensors: Any) -> None:
    extra = [str(vae)] if vae else []
    overrides = {"steps": 8, "checkpoint_every": 2, "vae": str(vae) if vae else None}
    cfg = load_config(config, quick=True, overrides=overrides)
    train(cfg, tmp_path / "straight")
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(config), str(tmp_path / "killed"), "5", *extra],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = torch.load(tmp_path / "killed" / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4  # step 5 was lost with the process
    result = train(cfg, tmp_path / "killed", resume=True)
    assert result.status == "finished" and result.steps_done == 8
    straight, resumed = checkpoint_tensors(tmp_path / "straight", 8), checkpoint_tensors(tmp_path / "killed", 8)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_vae_kill9_then_resume_is_bit_identical(tmp_path: Path, checkpoint_tensors: Any) -> None:
    _kill_and_resume(tmp_path, VAE_CONFIG, None, checkpoint_tensors)


@pytest.fixture(scope="module")
def quick_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quick-vae")
    result = train(load_config(VAE_CONFIG, quick=True), out)
    assert result.model_dir is not None
    return result.model_dir


@pytest.mark.slow
def test_unet_kill9_then_resume_is_bit_identical(tmp_path: Path, quick_vae: Path, checkpoint_tensors: Any) -> None:
    _kill_and_resume(tmp_path, UNET_CONFIG, quick_vae, checkpoint_tensors)


def test_quick_unet_trains_exports_and_tracks_in_mlflow(tmp_path: Path, quick_vae: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = load_config(UNET_CONFIG, quick=True, overrides={"vae": str(quick_vae)})
    mlruns = tmp_path / "mlruns"
    seen: list[int] = []
    result = train(cfg, tmp_path / "unet", mlflow_dir=mlruns, progress=lambda s, t, m: seen.append(s))
    assert result.status == "finished" and seen == list(range(1, cfg["steps"] + 1))
    unet = UNet2DConditionModel.from_pretrained(result.model_dir)
    vae = AutoencoderKL.from_pretrained(quick_vae)
    assert unet.config.cross_attention_dim == 384
    assert unet.config.sample_size == 64 // 2 ** (len(vae.config.block_out_channels) - 1)
    assert vae.config.scaling_factor != 1.0  # measured from latents at export
    assert (tmp_path / "unet" / "samples" / f"step-{cfg['steps']:06d}.png").is_file()
    # MLflow file store: one run with params, a loss curve and the sample grid
    metric_files = list(mlruns.glob("*/*/metrics/loss"))
    assert len(metric_files) == 1
    assert len(metric_files[0].read_text().splitlines()) >= 1
    run_dir = metric_files[0].parents[1]
    assert (run_dir / "params" / "lr").read_text() == str(cfg["lr"])
    assert list((run_dir / "artifacts" / "samples").glob("*.png"))
    assert json.loads((run_dir / "artifacts" / "config.json").read_text())["kind"] == "unet"


def test_nan_loss_stops_cleanly_keeping_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdmaker.training import _trainer

    cfg = load_config(VAE_CONFIG, quick=True)
    original = _trainer._Run.loss

    def poisoned(self, batch, step):  # type: ignore[no-untyped-def]
        loss, extra = original(self, batch, step)
        return (loss * float("nan") if step >= 3 else loss), extra

    monkeypatch.setattr(_trainer._Run, "loss", poisoned)
    result = train(cfg, tmp_path / "run")
    assert result.status == "diverged" and result.steps_done == 3 and result.model_dir is None
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_existing_checkpoint_requires_resume(tmp_path: Path) -> None:
    from sdmaker.errors import ConfigError

    cfg = load_config(VAE_CONFIG, quick=True)
    train(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, tmp_path / "run")
    other = load_config(VAE_CONFIG, quick=True, overrides={"lr": 0.5})
    with pytest.raises(ConfigError, match="different config"):
        train(other, tmp_path / "run", resume=True)


def test_warmup_stable_decay_schedule_and_lengthening_by_resume(tmp_path: Path) -> None:
    """A WSD run can be lengthened with --resume before its decay starts, and only then."""
    from sdmaker.errors import ConfigError
    from sdmaker.training._trainer import _lr_lambda, check_resumable

    fn = _lr_lambda({"warmup_steps": 2, "steps": 10, "decay_steps": 4, "min_lr_ratio": 0.1})
    assert [round(fn(s), 6) for s in range(3)] == [0.5, 1.0, 1.0]
    assert fn(5) == 1.0 and fn(6) == 1.0 and 0.1 < fn(8) < 1.0 and fn(10) == pytest.approx(0.1)
    old = {"warmup_steps": 2, "steps": 10, "decay_steps": 4, "min_lr_ratio": 0.1}
    longer = {**old, "steps": 20}
    check_resumable(old, longer, 6)  # decay had not started at step 6: the longer run saw the same LRs
    with pytest.raises(ConfigError, match="from step 7"):
        check_resumable(old, longer, 8)

    # end to end: 4 constant steps, then lengthened with a decay tail, resumed; a decayed one refuses shortening
    cfg = load_config(VAE_CONFIG, quick=True, overrides={"steps": 4, "min_lr_ratio": 1.0, "decay_steps": 0})
    train(cfg, tmp_path / "run")
    tail = load_config(VAE_CONFIG, quick=True, overrides={"steps": 6, "min_lr_ratio": 0.0, "decay_steps": 2})
    assert train(tail, tmp_path / "run", resume=True).steps_done == 6
    with pytest.raises(ConfigError, match="learning-rate or data schedule"):
        train(load_config(VAE_CONFIG, quick=True, overrides={"steps": 8, "min_lr_ratio": 0.0, "decay_steps": 2}),
              tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match="decay_steps"):
        load_config(VAE_CONFIG, quick=True, overrides={"steps": 4, "decay_steps": 5})


def test_decay_data_changes_the_mix_from_the_decay_on_and_only_a_branch_before_it_resumes() -> None:
    """decay_data anneals on another data mix; adding it to a run is a resume only before the decay starts."""
    from sdmaker.errors import ConfigError
    from sdmaker.training._config import data_for_step
    from sdmaker.training._data import _samples
    from sdmaker.training._trainer import check_resumable

    cfg = load_config(UNET_CONFIG, quick=True, overrides={"steps": 10, "decay_steps": 4, "batch_size": 16,
                                                          "decay_data": {"two_shape_prob": 1.0}})
    assert data_for_step(cfg, 5) == cfg["data"] and data_for_step(cfg, 6)["two_shape_prob"] == 1.0
    assert all(len(scene.shapes) == 2 for scene, _, _ in _samples(cfg, 6))
    assert any(len(scene.shapes) == 1 for scene, _, _ in _samples(cfg, 5))
    plain = {"warmup_steps": cfg["warmup_steps"], "steps": 10, "decay_steps": 4, "min_lr_ratio": cfg["min_lr_ratio"]}
    check_resumable(plain, cfg, 6)  # steps 0..5 ran on the same data: the annealed run is a branch of the plain one
    with pytest.raises(ConfigError, match="from step 6"):
        check_resumable(plain, cfg, 7)
    with pytest.raises(ConfigError, match="decay_data"):
        load_config(UNET_CONFIG, quick=True, overrides={"decay_data": {"colours": 3}})


def test_a_checkpoint_copied_to_a_new_folder_resumes_as_a_branch_with_its_own_mlflow_run(tmp_path: Path) -> None:
    """Resuming in place continues the MLflow run; a copy in another --out is a branch linked to its parent."""
    import shutil

    mlruns = tmp_path / "mlruns"
    cfg = load_config(VAE_CONFIG, quick=True, overrides={"steps": 4})
    parent = train(cfg, tmp_path / "a", mlflow_dir=mlruns, stop_after=2)
    assert parent.run_id is not None
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    branch = train(cfg, tmp_path / "b", resume=True, mlflow_dir=mlruns)
    assert branch.run_id not in (None, parent.run_id)
    (tags,) = mlruns.glob(f"*/{branch.run_id}/tags")  # the MLflow file store
    assert (tags / "parent_run_id").read_text() == parent.run_id and (tags / "branched_at_step").read_text() == "2"
    assert train(cfg, tmp_path / "a", resume=True, mlflow_dir=mlruns).run_id == parent.run_id


def test_loss_weights_put_the_named_weight_on_the_x0_error() -> None:
    from sdmaker.training._trainer import loss_weights

    snr = torch.tensor([0.01, 0.5, 4.0, 100.0])
    gamma = 5.0
    # eps loss = SNR x the x0 error, v loss = (SNR + 1) x it
    eps = loss_weights(snr, gamma, "min_snr", "epsilon") * snr
    assert torch.allclose(eps, torch.clamp(snr, max=gamma))
    v_same = loss_weights(snr, gamma, "min_snr", "v_prediction") * (snr + 1)
    assert torch.allclose(v_same, eps)  # the same weighting, whatever the network predicts
    v_plus = loss_weights(snr, gamma, "min_snr_plus_one", "v_prediction") * (snr + 1)
    assert torch.allclose(v_plus, torch.tensor([1.01, 1.5, 5.0, 5.0]))  # high noise keeps weight ~1


def test_bad_prediction_type_is_a_config_error_and_old_checkpoints_keep_their_digest(tmp_path: Path) -> None:
    from sdmaker.errors import ConfigError
    from sdmaker.training._config import DEFAULTS, config_digest

    cfg = load_config(UNET_CONFIG, quick=True, overrides={"vae": str(tmp_path)})
    with pytest.raises(ConfigError, match="prediction_type"):
        load_config(UNET_CONFIG, overrides={"vae": str(tmp_path), "prediction_type": "sample"})
    # a checkpoint written before these keys existed trained with their defaults: its digest is unchanged
    old = {k: v for k, v in cfg.items() if k not in ("prediction_type", "loss_weighting")}
    new = {**cfg, "prediction_type": DEFAULTS["prediction_type"], "loss_weighting": DEFAULTS["loss_weighting"]}
    assert config_digest(old) == config_digest(new)
    assert config_digest(cfg) != config_digest(new)  # the mini config predicts v: a different run


def test_random_colours_leave_the_base_images_alone_and_anchor_only_ordinary_scenes() -> None:
    import random

    from sdmaker.training._data import VaeBatches, image_to_tensor
    from sdmaker.training._scenes import random_palette, render, sample_scene

    base = load_config(VAE_CONFIG, quick=True)  # mini's recipe recolours half its scenes: take the key out
    base = {**base, "data": {k: v for k, v in base["data"].items() if k != "random_color_prob"}}
    plain = VaeBatches(base)[3]
    same = VaeBatches({**base, "data": {**base["data"], "random_color_prob": 0.0}})[3]
    assert torch.equal(plain["images"], same["images"]) and bool(plain["anchored"].all())
    mixed = VaeBatches({**base, "batch_size": 16, "data": {**base["data"], "random_color_prob": 0.5}})[3]
    assert 0 < int(mixed["anchored"].sum()) < 16  # some recoloured (free), some ordinary (anchored)
    assert not VaeBatches({**base, "data": {**base["data"], "random_color_prob": 1.0}})[3]["anchored"].any()

    scene = sample_scene(random.Random(1), two_shape_prob=1.0)
    palette = random_palette(scene, random.Random(2))
    assert set(palette) == {scene.background, *(s.color for s in scene.shapes)}
    values = list(palette.values())
    assert all(sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) ** 0.5 >= 80
               for i, p in enumerate(values) for q in values[i + 1:])
    assert palette == random_palette(scene, random.Random(2))  # a pure function of the rng
    corner = image_to_tensor(render(scene, palette=palette))[:, 0, 0]
    assert torch.allclose((corner + 1) * 127.5, torch.tensor(palette[scene.background], dtype=torch.float32),
                          atol=1.0)


def test_an_anchored_vae_fine_tune_keeps_its_init_latents_and_scale(tmp_path: Path, quick_vae: Path) -> None:
    from diffusers import AutoencoderKL

    from sdmaker.errors import ConfigError
    from sdmaker.training._data import VaeBatches

    config = ROOT / "configs" / "train" / "mini-vae-colors.json"
    seen: list[dict[str, float]] = []
    cfg = load_config(config, quick=True, overrides={"init_from": str(quick_vae), "steps": 3, "lr": 1e-3})
    result = train(cfg, tmp_path / "ft", progress=lambda s, t, m: seen.append(m))
    assert result.status == "finished" and result.model_dir is not None
    init, tuned = AutoencoderKL.from_pretrained(quick_vae), AutoencoderKL.from_pretrained(result.model_dir)
    assert tuned.config.scaling_factor == init.config.scaling_factor  # the UNet's latents keep their scale
    assert tuned.config.block_out_channels == init.config.block_out_channels
    batch = VaeBatches({**cfg, "data": {**cfg["data"], "random_color_prob": 0.0}})[0]["images"]
    with torch.no_grad():
        moved = (tuned.encode(batch).latent_dist.mean - init.encode(batch).latent_dist.mean).abs().mean()
    assert float(moved) > 0  # it trained

    # decoder only: every latent a UNet or adapter learned stays exactly as it is
    frozen = train(load_config(config, quick=True, overrides={"init_from": str(quick_vae), "steps": 2, "lr": 1e-3,
                                                              "freeze_encoder": True, "anchor_weight": 0.0}),
                   tmp_path / "dec")
    assert frozen.model_dir is not None
    dec = AutoencoderKL.from_pretrained(frozen.model_dir)
    for name, weight in init.encoder.state_dict().items():
        assert torch.equal(weight, dec.encoder.state_dict()[name]), name
    assert any(not torch.equal(w, dec.decoder.state_dict()[n]) for n, w in init.decoder.state_dict().items())
    assert dec.config.scaling_factor == init.config.scaling_factor  # same latents, so the same scale for the UNet

    with pytest.raises(ConfigError, match="random_color_prob"):
        load_config(config, quick=True, overrides={"data": {"random_color_prob": 2}})
