"""The training loop shared by the VAE and the UNet: AdamW, EMA, checkpoints, exact resume, tracking.

Exact resume: a checkpoint holds the model, EMA weights, optimizer, LR scheduler, RNG states (torch,
numpy, python) and the step. The data of step ``s`` and its noise/timesteps are pure functions of
``(seed, s)``, so a run killed with ``kill -9`` and resumed from its last checkpoint ends with weights
bit-identical to an uninterrupted run (same thread count, same machine). Checkpoints are written to a
temporary file and renamed (atomic); a NaN or diverging loss stops the run without overwriting the last
good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdmaker.errors import ConfigError
from sdmaker.files import atomic_path, staged_dir
from sdmaker.training._config import SCHEDULE_KEYS, config_digest, data_for_step, decay_start, require_trained_vae
from sdmaker.training._data import UnetBatches, VaeBatches, make_loader, shape_pixel_weights
from sdmaker.training._models import build_scheduler, build_unet, build_vae
from sdmaker.training._tracking import Tracker

__all__ = ["CHECKPOINT_FILE", "EXPORT_DIR", "LORA_FILE", "TRAINING_FILE", "lora_metadata", "loss_weights", "predicted_x0", "ProgressFn", "TrainResult", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
EXPORT_DIR = "model"
#: Beside an exported UNet: the training facts its pipeline needs (``prediction_type``).
TRAINING_FILE = "sdmaker-training.json"
#: Beside an exported LoRA: its base model (name and digest), rank, alpha, targets and the concept it teaches.
LORA_FILE = "sdmaker-lora.json"
#: ``progress(step, total, metrics)`` after every optimisation step.
ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path | None
    steps_done: int
    status: str  # finished | diverged
    seconds: float
    final_loss: float | None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def loss_weights(snr: torch.Tensor, gamma: float, weighting: str, prediction_type: str) -> torch.Tensor:
    """Per-sample weights on the epsilon or v loss that give the x0 error the weight ``weighting`` names.

    The epsilon loss is SNR x the x0 error and the v loss (SNR + 1) x it, so the weight on the x0 error is
    divided by those. ``min_snr`` (the min-SNR-gamma paper) weighs the x0 error min(SNR, gamma);
    ``min_snr_plus_one`` weighs it min(SNR + 1, gamma): as much at high noise as at mid noise.
    """
    x0_weight = torch.clamp(snr + 1 if weighting == "min_snr_plus_one" else snr, max=gamma)
    return x0_weight / (snr + 1 if prediction_type == "v_prediction" else snr)


def predicted_x0(noisy: torch.Tensor, pred: torch.Tensor, alphas_cumprod: torch.Tensor,
                 v_prediction: bool) -> torch.Tensor:
    """The clean latents a UNet output implies at noise level ``alphas_cumprod`` (one value per row).

    x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0, so x0 = sqrt(a) x_t - sqrt(1 - a) v,
    or (x_t - sqrt(1 - a) eps) / sqrt(a) for an epsilon model.
    """
    a = alphas_cumprod.view(-1, 1, 1, 1).to(pred.dtype)
    if v_prediction:
        return a.sqrt() * noisy - (1 - a).sqrt() * pred
    return (noisy - (1 - a).sqrt() * pred) / a.sqrt()


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + step) * 104_729 + 17)


def _lr_lambda(cfg: dict[str, Any]) -> Callable[[int], float]:
    """Linear warm-up, then either a cosine to ``min_lr_ratio`` over the whole run (``decay_steps`` 0) or
    warmup-stable-decay: constant until the last ``decay_steps`` steps, then a cosine to ``min_lr_ratio``.

    Why the second form: its LR at step ``s`` does not depend on the run's length until the decay starts, so
    a run can be lengthened with ``--resume`` and still be exactly the run its final config describes.
    """
    warmup, total, floor = int(cfg["warmup_steps"]), int(cfg["steps"]), float(cfg["min_lr_ratio"])
    start = decay_start(cfg)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if start is not None:
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / max(1, total - start))
        else:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


#: What a checkpoint records of its LR schedule: the keys the digest leaves out, plus the warm-up.
_PLAN_KEYS = ("warmup_steps", *SCHEDULE_KEYS)


def _plan(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg.get(k) for k in _PLAN_KEYS}


def check_resumable(old_plan: dict[str, Any], cfg: dict[str, Any], step: int) -> None:
    """Refuse to resume at ``step`` when the new schedule differs from the old one on steps already run.

    Lengthening a run (``steps``), its decay or its decay-phase data is allowed exactly when the steps done
    so far saw the same learning rates and data settings under both schedules: then the resumed run is the
    uninterrupted run of the new config.
    """
    old_cfg = {**cfg, "decay_data": {}, **old_plan}  # checkpoints from before decay_data existed had none
    old_fn, new_fn = _lr_lambda(old_cfg), _lr_lambda(cfg)
    for s in range(step + 1):  # the LR of step ``step`` (the next one) is already in the optimizer state
        if (not math.isclose(old_fn(s), new_fn(s), rel_tol=1e-12, abs_tol=0.0)
                or (s < step and data_for_step(old_cfg, s) != data_for_step(cfg, s))):
            raise ConfigError(
                f"the checkpoint at step {step} was trained with a learning-rate or data schedule that differs from this "
                f"config's from step {s} on (old {old_plan}, new {_plan(cfg)}); resume it with its own schedule, "
                "or change steps/decay_steps only where the decay has not started yet", field="steps")


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class _Run:
    """State of one training run (model, EMA, optimizer, scheduler) and its per-kind loss."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg["seed"])  # weight init only
        self.anchor: Any = None
        if cfg["kind"] == "vae":
            if cfg.get("init_from"):  # fine-tuning an existing VAE (its architecture and weights)
                from diffusers import AutoencoderKL

                self.model = AutoencoderKL.from_pretrained(cfg["init_from"], torch_dtype=torch.float32)
                if cfg["anchor_weight"]:  # the frozen init encoder: where ordinary scenes' latents must stay
                    import copy

                    self.anchor = copy.deepcopy(self.model).eval().requires_grad_(False)
            else:
                self.model = build_vae(cfg["model"])
            if cfg["freeze_encoder"]:
                for part in (self.model.encoder, self.model.quant_conv):
                    if part is not None:
                        part.requires_grad_(False)
            self.vae_scaling = 1.0
        elif cfg["kind"] == "lora":
            from diffusers import AutoencoderKL

            self.vae_scaling = float(AutoencoderKL.load_config(str(require_trained_vae(cfg))).get("scaling_factor", 1.0))
            self.model = _lora_unet(cfg)
            self._noise_schedule(cfg)
        else:
            from diffusers import AutoencoderKL

            vae_cfg = AutoencoderKL.load_config(str(require_trained_vae(cfg)))
            factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
            self.vae_scaling = float(vae_cfg.get("scaling_factor", 1.0))
            if cfg.get("init_from"):  # fine-tuning: the architecture and weights of an existing UNet
                from diffusers import UNet2DConditionModel

                self.model = UNet2DConditionModel.from_pretrained(cfg["init_from"], torch_dtype=torch.float32)
            else:
                self.model = build_unet(cfg["model"], sample_size=64 // factor,
                                        in_channels=vae_cfg["latent_channels"], cross_attention_dim=384)
            self._noise_schedule(cfg)
        self.decoder: Any = None
        if cfg.get("pixel_loss"):  # frozen: the pixel loss only passes gradients through it
            from diffusers import AutoencoderKL

            self.decoder = AutoencoderKL.from_pretrained(str(require_trained_vae(cfg)), torch_dtype=torch.float32)
            self.decoder.eval().requires_grad_(False)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))

    def _noise_schedule(self, cfg: dict[str, Any]) -> None:
        self.noise_sched = build_scheduler("ddpm", cfg["prediction_type"])
        ac = self.noise_sched.alphas_cumprod
        self.snr = ac / (1 - ac)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained weights: the whole model, or only the adapter's (a LoRA's base is frozen and not saved)."""
        if self.cfg["kind"] != "lora":
            return self.model.state_dict()
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.cfg["kind"] != "lora":
            self.model.load_state_dict(state)
            return
        result = self.model.load_state_dict(state, strict=False)
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if result.unexpected_keys or trained - set(state):
            raise ConfigError("the checkpoint's adapter weights do not match this config's adapter "
                              f"(missing {sorted(trained - set(state))[:3]}, unexpected {result.unexpected_keys[:3]})",
                              field="lora")

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        gen = _step_generator(self.cfg["seed"], step)
        if self.cfg["kind"] == "vae":
            x = batch["images"]
            post = self.model.encode(x).latent_dist
            z = post.mean
            if self.cfg.get("sample_posterior", True):
                z = z + post.std * torch.randn(post.mean.shape, generator=gen)
            recon = self.model.decode(z).sample
            mse = torch.mean((recon - x) ** 2)
            l1 = torch.mean(torch.abs(recon - x))
            kl = post.kl().mean() / z[0].numel()
            total = mse + self.cfg.get("l1_weight", 0.5) * l1 + self.cfg["kl_weight"] * kl
            extra = {"mse": mse.item(), "kl": kl.item()}
            keep = batch.get("anchored")
            if self.anchor is not None and keep is not None and bool(keep.any()):
                with torch.no_grad():
                    ref = self.anchor.encode(x[keep]).latent_dist.mean
                drift = torch.mean((post.mean[keep] - ref) ** 2)
                total = total + self.cfg["anchor_weight"] * drift
                extra["anchor_mse"] = drift.item()
                if self.cfg["anchor_noise"]:  # the decoder too, around the old latents
                    near = ref + self.cfg["anchor_noise"] * torch.randn(ref.shape, generator=gen)
                    with torch.no_grad():
                        want = self.anchor.decode(near).sample
                    dec = torch.mean(torch.abs(self.model.decode(near).sample - want))
                    total = total + self.cfg["anchor_weight"] * dec
                    extra["anchor_decoder_l1"] = dec.item()
            return total, extra
        latents, embeds = batch["latents"], batch["embeds"]
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen)
        if self.cfg["noise_offset"]:
            noise = noise + self.cfg["noise_offset"] * torch.randn((bsz, latents.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, self.noise_sched.config.num_train_timesteps, (bsz,), generator=gen)
        noisy = self.noise_sched.add_noise(latents, noise, t)
        keep = ~batch["concept"] if self.cfg.get("preserve_weight") else None
        base = self._base_prediction(noisy, t, embeds, keep) if keep is not None and bool(keep.any()) else None
        pred = self.model(noisy, t, embeds).sample
        v_pred = self.cfg["prediction_type"] == "v_prediction"
        target = self.noise_sched.get_velocity(latents, noise, t) if v_pred else noise
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        if self.cfg["snr_gamma"]:  # less effort on the trivial low-noise steps: faster convergence
            per = per * loss_weights(self.snr[t], float(self.cfg["snr_gamma"]), self.cfg["loss_weighting"],
                                     self.cfg["prediction_type"])
        total, extra = per.mean(), {}
        if base is not None and keep is not None:  # keep the ordinary scenes' predictions where the base puts them
            drift = ((pred[keep] - base) ** 2).mean()
            total = total + float(self.cfg["preserve_weight"]) * keep.float().mean() * drift
            extra = {"preserve_mse": drift.item()}
        pix = self.cfg.get("pixel_loss")
        if not pix:
            return total, extra
        rows = t < int(pix["max_timestep"])
        if not bool(rows.any()):
            return total, {**extra, "pixel_l1": 0.0}
        x0 = predicted_x0(noisy[rows], pred[rows], self.noise_sched.alphas_cumprod[t[rows]], v_pred)
        target_px = batch["images"][rows]
        drawn = self.decoder.decode(x0 / self.vae_scaling).sample
        pixel = ((drawn - target_px).abs() * shape_pixel_weights(target_px, float(pix.get("shape_weight", 0.0)))).mean()
        share = rows.float().mean()  # the rows it covers, so it is a per-sample average like the latent loss
        return total + float(pix["weight"]) * share * pixel, {**extra, "pixel_l1": pixel.item()}

    @torch.no_grad()
    def _base_prediction(self, noisy: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                         rows: torch.Tensor) -> torch.Tensor:
        """The frozen base's prediction on ``rows`` (the adapter switched off), before the adapted forward: the
        switch touches the adapter's ``requires_grad``, which must not happen inside a graph being built."""
        self.model.disable_adapters()
        try:
            return self.model(noisy[rows], t[rows], embeds[rows]).sample
        finally:
            self.model.enable_adapters()

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.cfg["ema_decay"], (1 + step) / (10 + step))
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)

    def state(self, step: int, run_id: str | None, best: float, out_dir: Path) -> dict[str, Any]:
        """Everything an exact resume needs, plus the folder it was written in (a copy elsewhere is a branch)."""
        return {
            "step": step, "config_digest": config_digest(self.cfg), "model": self.trained_state(),
            "ema": [t.clone() for t in self.ema], "optimizer": self.opt.state_dict(),
            "lr_scheduler": self.sched.state_dict(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(), "mlflow_run_id": run_id,
            "best_loss": best, "lr_plan": _plan(self.cfg), "out_dir": str(out_dir.resolve()),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt["config_digest"] != config_digest(self.cfg):
            raise ConfigError("the checkpoint was written by a different config; resume needs the same config "
                              "(or start without --resume in a new --out folder)", field="config")
        if "lr_plan" in ckpt:
            check_resumable(ckpt["lr_plan"], self.cfg, int(ckpt["step"]))
        self.load_trained_state(ckpt["model"])
        for dst, src in zip(self.ema, ckpt["ema"], strict=True):
            dst.copy_(src)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["lr_scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        random.setstate(ckpt["python_rng"])

    def ema_model(self) -> Any:
        """A copy of the model carrying the EMA weights (what gets exported)."""
        import copy

        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, e in zip([p for p in model.parameters() if p.requires_grad], self.ema, strict=True):
                p.copy_(e)
        return model.eval()


def _lora_unet(cfg: dict[str, Any]) -> Any:
    """The base model's UNet (fp32, frozen) with a fresh PEFT LoRA adapter on ``lora.target_modules``.

    The adapter's A matrices are initialised from torch's global RNG (seeded by the caller) and its B
    matrices are zero, so step 0 is exactly the base model.
    """
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(Path(cfg["base_path"]) / "unet", torch_dtype=torch.float32)
    unet.requires_grad_(False)
    lora = cfg["lora"]
    unet.add_adapter(LoraConfig(r=int(lora["rank"]), lora_alpha=int(lora["alpha"]),
                                target_modules=list(lora["target_modules"]), init_lora_weights=True))
    return unet


def lora_metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the adapter file records about itself (diffusers' ``lora_adapter_metadata``: a LoraConfig)."""
    lora = cfg["lora"]
    return {"r": int(lora["rank"]), "lora_alpha": int(lora["alpha"]),
            "target_modules": sorted(lora["target_modules"]), "init_lora_weights": True, "use_dora": False,
            "use_rslora": False, "lora_bias": False, "peft_type": "LORA"}


def _export_lora(run: _Run, dest: Path) -> None:
    """Write the EMA adapter in diffusers' LoRA layout (``pytorch_lora_weights.safetensors``) + its facts."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    model = run.ema_model()
    layers = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    StableDiffusionPipeline.save_lora_weights(dest, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=lora_metadata(run.cfg))
    from sdmaker.files import weights_digest  # what the base must match: its UNet and text conditioning, not its card

    data = run.cfg.get("data", {})
    facts = {"kind": "lora", "base": run.cfg["base"], "base_digest": run.cfg["base_digest"],
             "base_weights_digest": weights_digest(Path(run.cfg["base_path"])),
             **{k: v for k, v in lora_metadata(run.cfg).items() if k in ("r", "lora_alpha", "target_modules")},
             "extra_shapes": data.get("extra_shapes", []), "extra_colors": data.get("extra_colors", []),
             "steps": int(run.cfg["steps"]), "config": run.cfg["name"], "config_digest": config_digest(run.cfg)}
    (dest / LORA_FILE).write_text(json.dumps(facts, indent=2) + "\n")


def _export(run: _Run, out_dir: Path) -> Path:
    """Save the EMA model as a diffusers component folder (``out_dir/model``), atomically."""
    from sdmaker.training._sampling import vae_latent_scale

    if run.cfg["kind"] == "lora":
        dest = out_dir / EXPORT_DIR
        with staged_dir(dest) as tmp:
            _export_lora(run, tmp)
        return dest
    model = run.ema_model()
    # an anchored fine-tune, or one with the encoder frozen, keeps its init's latent scale: the latents (and so the
    # scale a UNet was trained with) are the init's; re-estimating it would shift every latent the UNet sees
    if run.cfg["kind"] == "vae" and run.anchor is None and not run.cfg.get("freeze_encoder"):
        scale = vae_latent_scale(model, run.cfg)
        model.register_to_config(scaling_factor=scale)  # the pipeline multiplies latents by exactly this
    dest = out_dir / EXPORT_DIR
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if run.cfg["kind"] == "unet":  # what the exported scheduler must say the UNet predicts
            (tmp / TRAINING_FILE).write_text(json.dumps({"prediction_type": run.cfg["prediction_type"]}) + "\n")
    return dest


def train(cfg: dict[str, Any], out_dir: Path, *, resume: bool = False, mlflow_dir: Path | None = None,
          progress: ProgressFn | None = None, text_model_dir: Path | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train the VAE or UNet of ``cfg`` into ``out_dir`` (checkpoint + exported EMA model + sample grid).

    ``stop_after`` ends the run early after that many steps *of this invocation* (used by tests to simulate
    an interrupted run without killing a process); the checkpoint is then written as on a normal stop.
    """
    from sdmaker.training._sampling import sample_grid

    started = time.perf_counter()
    torch.set_num_threads(int(cfg["threads"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_FILE
    run = _Run(cfg)
    start_step, run_id, best = 0, None, math.inf
    tags: dict[str, str] = {}
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file, written above
        run.restore(ckpt)
        start_step, run_id, best = int(ckpt["step"]), ckpt.get("mlflow_run_id"), float(ckpt.get("best_loss", math.inf))
        logger.info("resuming %s from step %d", out_dir, start_step)
        if ckpt.get("out_dir") not in (None, str(out_dir.resolve())) and run_id is not None:
            # a checkpoint copied into a new folder is a branch: its own MLflow run, linked to its parent,
            # so the parent's curves are not overwritten from the branch point on
            tags = {"parent_run_id": run_id, "branched_at_step": str(start_step), "branched_from": ckpt["out_dir"]}
            run_id = None
    elif ckpt_path.exists() and not resume:
        raise ConfigError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose another "
                          "--out", field="out", value=str(out_dir))
    tracker = Tracker(mlflow_dir, f"sdmaker-train-{cfg['kind']}", enabled=mlflow_dir is not None)
    run_id = tracker.start(cfg["name"], cfg, run_id=run_id, tags={"kind": cfg["kind"], **tags})
    if cfg["kind"] == "vae":
        dataset: Any = VaeBatches(cfg)
    else:
        if text_model_dir is None:
            from sdmaker.engine import minilm_dir

            text_model_dir = minilm_dir()
        dataset = UnetBatches(cfg, text_model_dir)
    total = int(cfg["steps"])
    step, status, last_loss, smooth = start_step, "finished", None, None
    window_t, window_n = time.perf_counter(), 0
    images_per_s = 0.0
    loader = make_loader(dataset, start_step, int(cfg["num_workers"]))
    for batch in loader:
        if stop_after is not None and step - start_step >= stop_after:
            break
        assert int(batch["step"]) == step, "data position out of sync with the training step"
        loss, extra = run.loss(batch, step)
        if not torch.isfinite(loss):
            logger.warning("loss is %s at step %d: stopping; the last good checkpoint is kept", float(loss), step)
            tracker.set_tag("stopped", f"non-finite loss at step {step}")
            status = "diverged"
            break
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg["grad_clip"]))
        lr = float(run.sched.get_last_lr()[0])
        run.opt.step()
        run.sched.step()
        run.update_ema(step)
        step += 1
        last_loss = loss.item()
        smooth = last_loss if smooth is None else 0.98 * smooth + 0.02 * last_loss
        window_n += cfg["batch_size"]
        if step > cfg["warmup_steps"]:
            best = min(best, smooth)
            if smooth > cfg["divergence_factor"] * best:
                logger.warning("loss diverged at step %d (%.4g > %g x best %.4g): stopping; last good checkpoint "
                               "kept", step, smooth, cfg["divergence_factor"], best)
                tracker.set_tag("stopped", f"diverged at step {step}")
                status = "diverged"
                break
        if step % cfg["log_every"] == 0 or step == total:
            now = time.perf_counter()
            images_per_s = window_n / max(now - window_t, 1e-9)
            window_t, window_n = now, 0
            tracker.log_metrics({"loss": last_loss, "loss_smooth": smooth, "lr": lr, "grad_norm": grad_norm,
                                 "images_per_s": images_per_s, **extra}, step)
        if progress is not None:
            progress(step, total, {"loss": last_loss, "lr": lr, "images_per_s": images_per_s})
        if step % cfg["checkpoint_every"] == 0 or step == total:
            _atomic_save(run.state(step, run_id, best, out_dir), ckpt_path)
        if cfg["sample_every"] and step % cfg["sample_every"] == 0 and step < total:
            grid = sample_grid(run, out_dir, step, text_model_dir)
            tracker.log_artifact(grid, "samples")
    if status == "finished" and stop_after is not None and step < total:
        _atomic_save(run.state(step, run_id, best, out_dir), ckpt_path)
        tracker.end("KILLED")
        return TrainResult(out_dir, None, step, "stopped", time.perf_counter() - started, last_loss, run_id)
    model_dir = None
    if status == "finished":
        model_dir = _export(run, out_dir)
        grid = sample_grid(run, out_dir, step, text_model_dir)
        tracker.log_artifact(grid, "samples")
    seconds = time.perf_counter() - started
    tracker.log_metrics({"train_seconds_this_invocation": seconds}, step)
    tracker.end("FINISHED" if status == "finished" else "FAILED")
    return TrainResult(out_dir, model_dir, step, status, seconds, last_loss, run_id)
