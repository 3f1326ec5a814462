"""Training configs: a JSON (or YAML) file -> a validated, fully defaulted dict.

The committed built-in weights come from ``configs/train/mini-vae.json`` and ``mini-unet.json``; the
``quick`` block of a config overrides keys for the seconds-long recipe used by tests (``--quick``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from sdmaker.errors import ConfigError

__all__ = ["DEFAULTS", "LORA_TARGETS", "LOSS_WEIGHTINGS", "PREDICTION_TYPES", "SCHEDULE_KEYS", "config_digest",
           "data_for_step", "decay_start", "load_config", "prepare_lora", "require_trained_vae"]

DEFAULTS: dict[str, Any] = {
    "kind": "unet",  # vae | unet | lora
    "name": "run",
    "seed": 0,
    "steps": 1000,
    "batch_size": 32,
    "lr": 5e-4,
    "min_lr_ratio": 0.1,
    "decay_steps": 0,  # 0: cosine over the whole run; N: constant LR, then a cosine over the last N steps
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "threads": 1,
    "num_workers": 1,
    "checkpoint_every": 200,
    "log_every": 10,
    "sample_every": 0,  # 0: sample grid only at the end
    "divergence_factor": 20.0,  # loss > factor x its running minimum (after warmup) -> stop
    "model": {},
    "data": {"two_shape_prob": 0.35, "jitter": 1.0},
    # keys of "data" that change once the decay starts (decay_steps > 0): anneal on the hard cases
    "decay_data": {},
    "caption_dropout": 0.1,
    "noise_offset": 0.05,
    "snr_gamma": 5.0,
    # unet: what the network predicts ("epsilon" or "v_prediction", written into the exported scheduler) and
    # how timesteps are weighted, as a weight on the x0 error: "min_snr" min(SNR, gamma), the min-SNR paper's;
    # "min_snr_plus_one" min(SNR + 1, gamma), which keeps weight ~1 on the high-noise steps where the layout
    # of a scene (which colour goes on which shape, where) is decided, instead of SNR (~0.005-0.4 there).
    "prediction_type": "epsilon",
    "loss_weighting": "min_snr",
    "kl_weight": 1e-6,
    # vae fine-tune (init_from): weight of the anchor loss that keeps the encoder's latents of ordinary scenes
    # where the init VAE put them (mean squared latent difference), so a UNet trained on the old latents still
    # fits; images recoloured by data.random_color_prob are free to get latents of their own
    "anchor_weight": 0.0,
    # ... and the decoder's output near those latents (Gaussian noise of this std, in unscaled latent units, on
    # the init encoder's latents of ordinary scenes): a UNet's samples are never exactly on the encoder's
    # manifold, and a decoder kept only at the exact latents drew artifacts around them (base eval 98.4 -> 93.0)
    "anchor_noise": 0.0,
    # vae fine-tune: train the decoder only (the encoder, and so every latent a UNet or adapter was trained on,
    # stays exactly as it is)
    "freeze_encoder": False,
    # unet/lora: a second loss in pixel space: the x0 the UNet predicts, decoded by the frozen VAE decoder,
    # against the training image (L1; the shapes' pixels weighted 1 + shape_weight), on the steps with
    # timestep < max_timestep, times weight. Why: the latent loss weighs every latent direction alike, while
    # mini's decoder turns a small shift of a shape's latent into another colour (pink drawn white or purple)
    "pixel_loss": None,
    # lora: on the rows of ordinary (non-concept) scenes and on every row whose caption was dropped (the
    # unconditional prediction, which guidance subtracts from every prompt's), the mean squared difference
    # between the adapted UNet's prediction and the frozen base's (the adapter switched off, same input),
    # times this weight. Why: the ground-truth loss alone lets an adapter drift on what the base already draws
    # right (forgetting), which capped the share of concept scenes a run could afford (base eval -1.3 at 50%)
    "preserve_weight": 0.0,
    "vae": None,  # unet: folder of the trained VAE (relative to the config file or absolute)
    "max_length": 32,
    # lora: the base model (built-in name or model folder; the CLI resolves it, :func:`prepare_lora`) and the
    # adapter (PEFT LoraConfig: rank r, lora_alpha, the attention projections it adapts)
    "base": None,
    "lora": {"rank": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    # vae/unet: start from these weights (a VAE or UNet folder) instead of a fresh init (fine-tuning)
    "init_from": None,
}
_KINDS = ("vae", "unet", "lora")
#: Module names a LoRA may adapt: the attention projections of the UNet's transformer blocks and their
#: feed-forward layers (``ff.net.0.proj``, ``ff.net.2``), and the blocks' in/out projections.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
_EXTRA_DATA_KEYS = ("extra_shapes", "extra_colors", "concept_prob")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("min_snr", "min_snr_plus_one")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Path, *, quick: bool = False, kind: str | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read ``path``, apply defaults, the ``quick`` block (``--quick``) and ``overrides``; validate.

    A relative ``vae`` folder (UNet configs) is taken relative to the current directory, like ``--out``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config {path} cannot be read: {exc}", field="config", value=str(path)) from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # pyyaml ships with transformers

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a config error
        raise ConfigError(f"config {path} is not valid: {exc}", field="config", value=str(path)) from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping", field="config", value=str(path))
    quick_over = raw.pop("quick", {}) or {}
    cfg = _merge(DEFAULTS, raw)
    if quick:
        cfg = _merge(cfg, quick_over)
        cfg["quick"] = True
    if overrides:
        cfg = _merge(cfg, {k: v for k, v in overrides.items() if v is not None})
    if kind is not None and cfg["kind"] != kind:
        raise ConfigError(f"config {path} is a {cfg['kind']!r} config, not {kind!r}", field="kind", value=cfg["kind"])
    if cfg["kind"] not in _KINDS:
        raise ConfigError(f"kind={cfg['kind']!r} is not valid; allowed: {', '.join(_KINDS)}", field="kind")
    for key in ("steps", "batch_size", "checkpoint_every", "threads"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer", field=key, value=cfg[key])
    if not isinstance(cfg["decay_steps"], int) or not 0 <= cfg["decay_steps"] <= cfg["steps"]:
        raise ConfigError(f"decay_steps={cfg['decay_steps']!r} must be an integer from 0 to steps ({cfg['steps']})",
                          field="decay_steps", value=cfg["decay_steps"])
    unknown = sorted(set(cfg["decay_data"]) - set(cfg["data"])) if isinstance(cfg["decay_data"], dict) else ["?"]
    if unknown:
        raise ConfigError(f"decay_data must be a mapping of keys of 'data' (got {unknown})", field="decay_data",
                          value=cfg["decay_data"])
    if cfg["decay_data"] and not cfg["decay_steps"]:
        raise ConfigError("decay_data needs decay_steps > 0: it applies from the start of the decay",
                          field="decay_data", value=cfg["decay_data"])
    for key, allowed in (("prediction_type", PREDICTION_TYPES), ("loss_weighting", LOSS_WEIGHTINGS)):
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}={cfg[key]!r} is not valid; allowed: {', '.join(allowed)}", field=key,
                              value=cfg[key])
    _check_data(cfg["data"])
    _check_pixel_loss(cfg)
    if cfg["kind"] == "lora":
        _check_lora(cfg)
    _check_numbers(cfg, "", (("preserve_weight", 0.0, 1000.0, 0.0),))
    if cfg["preserve_weight"] and cfg["kind"] != "lora":
        raise ConfigError("preserve_weight needs a lora config: it compares the adapted UNet with its frozen base",
                          field="preserve_weight", value=cfg["preserve_weight"])
    if cfg["init_from"]:
        cfg["init_from"] = str(Path(cfg["init_from"]).resolve())
    if cfg["kind"] == "unet":
        if not cfg["vae"]:
            raise ConfigError("a unet config needs 'vae': the folder of the trained VAE", field="vae")
        cfg["vae"] = str(Path(cfg["vae"]).resolve())
    cfg["config_path"] = str(path.resolve())
    return cfg


def _check_data(data: dict[str, Any]) -> None:
    """The opt-in concept keys of ``data``: known extra shapes/colours and a probability."""
    from sdmaker.training._scenes import EXTRA_COLORS, EXTRA_SHAPES

    for key, known in (("extra_shapes", EXTRA_SHAPES), ("extra_colors", tuple(EXTRA_COLORS))):
        value = data.get(key, [])
        if not isinstance(value, list) or any(v not in known for v in value):
            raise ConfigError(f"data.{key}={value!r} must be a list of {', '.join(known)}", field=f"data.{key}",
                              value=value)
    from sdmaker.training._captions import CAPTION_STYLES

    if data.get("captions", "base") not in CAPTION_STYLES:
        raise ConfigError(f"data.captions={data.get('captions')!r} is not valid; allowed: {', '.join(CAPTION_STYLES)}",
                          field="data.captions", value=data.get("captions"))
    prob = data.get("concept_prob", 0.0)
    if not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ConfigError(f"data.concept_prob={prob!r} must be a number from 0 to 1", field="data.concept_prob",
                          value=prob)
    recolor = data.get("random_color_prob", 0.0)
    if not isinstance(recolor, (int, float)) or isinstance(recolor, bool) or not 0.0 <= recolor <= 1.0:
        raise ConfigError(f"data.random_color_prob={recolor!r} must be a number from 0 to 1",
                          field="data.random_color_prob", value=recolor)
    if prob and not (data.get("extra_shapes") or data.get("extra_colors")):
        raise ConfigError("data.concept_prob needs data.extra_shapes or data.extra_colors",
                          field="data.concept_prob", value=prob)
    fit = data.get("fit_latents")
    if fit is not None:
        from sdmaker.training._scenes import COLORS

        colors = fit.get("colors") if isinstance(fit, dict) else None
        known = (*COLORS, *EXTRA_COLORS)
        if not isinstance(colors, list) or not colors or any(c not in known for c in colors):
            raise ConfigError(f"data.fit_latents.colors={colors!r} must be a non-empty list of {', '.join(known)}",
                              field="data.fit_latents.colors", value=colors)
        _check_numbers(fit, "data.fit_latents", (("iters", 1, 1000, None), ("lr", 1e-6, 10.0, None),
                                                 ("shape_weight", 0.0, 1000.0, 0.0)))


def _check_numbers(section: dict[str, Any], prefix: str, ranges: tuple[tuple[str, float, float, Any], ...]) -> None:
    """Each ``(key, low, high, default)`` of ``ranges`` is a number within [low, high] in ``section``."""
    for key, low, high, default in ranges:
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            name = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{name}={value!r} must be a number from {low} to {high}", field=name, value=value)


def _check_pixel_loss(cfg: dict[str, Any]) -> None:
    pix = cfg.get("pixel_loss")
    if pix is None:
        return
    if cfg["kind"] == "vae" or not isinstance(pix, dict):
        raise ConfigError("pixel_loss must be a mapping {weight, max_timestep, shape_weight} on a unet or lora config",
                          field="pixel_loss", value=pix)
    unknown = sorted(set(pix) - {"weight", "max_timestep", "shape_weight"})
    if unknown:
        raise ConfigError(f"pixel_loss has unknown keys {unknown}; allowed: weight, max_timestep, shape_weight",
                          field="pixel_loss", value=pix)
    _check_numbers(pix, "pixel_loss", (("weight", 0.0, 1000.0, None), ("max_timestep", 1, 1000, None),
                                       ("shape_weight", 0.0, 1000.0, 0.0)))


def _check_lora(cfg: dict[str, Any]) -> None:
    if not cfg["base"]:
        raise ConfigError("a lora config needs 'base': the model it adapts (a built-in name such as mini, or a "
                          "model folder)", field="base")
    lora = cfg["lora"]
    for key in ("rank", "alpha"):  # integers: PEFT's LoraConfig types lora_alpha as int
        if not isinstance(lora.get(key), int) or isinstance(lora.get(key), bool) or lora[key] <= 0:
            raise ConfigError(f"lora.{key}={lora.get(key)!r} must be a positive integer", field=f"lora.{key}",
                              value=lora.get(key))
    targets = lora.get("target_modules")
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise ConfigError(f"lora.target_modules={targets!r} must be a non-empty list of {', '.join(LORA_TARGETS)}",
                          field="lora.target_modules", value=targets)


def prepare_lora(cfg: dict[str, Any], base_dir: Path, base_digest: str) -> dict[str, Any]:
    """``cfg`` with the resolved base model: its folder, digest, VAE and what its UNet predicts.

    The digest enters :func:`config_digest`, so a checkpoint only resumes on the same base weights.
    """
    base_dir = Path(base_dir)
    sched = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    return {**cfg, "base_path": str(base_dir.resolve()), "base_digest": base_digest,
            "vae": str((base_dir / "vae").resolve()), "prediction_type": sched.get("prediction_type", "epsilon")}


def require_trained_vae(cfg: dict[str, Any]) -> Path:
    """The VAE folder a UNet config trains on; a clear error when it was not trained yet.

    Checked where training starts, not in :func:`load_config`: reading a config (a resume's digest check,
    ``eval``) needs no VAE. Without it diffusers takes the missing folder for a hub id and fails with
    "couldn't connect to huggingface.co", which says nothing about the real cause.
    """
    vae = Path(cfg["vae"])
    if not (vae / "config.json").is_file():
        raise ConfigError(f"the trained VAE {vae} does not exist (no config.json there): the UNet trains "
                          f"on its latents, so train the VAE first: {_vae_command(vae)}, or pass --vae FOLDER",
                          field="vae", value=str(vae))
    return vae


def _vae_command(vae: Path) -> str:
    """The ``sdmaker train vae`` command that writes ``vae`` (a run's ``model`` folder), as far as it can tell."""
    if vae.name != "model" or not vae.parent.name:
        return "`sdmaker train vae --config configs/train/mini-vae.json --out RUN` (the VAE is RUN/model)"
    run = vae.parent.name
    quick = run.endswith("-quick")
    name = run.removesuffix("-quick")
    return (f"`sdmaker train vae --config configs/train/{name}.json{' --quick' if quick else ''} "
            f"--out {vae.parent}`")


#: Left out of the digest: a resume checks the schedule itself, step by step (``check_resumable``).
SCHEDULE_KEYS = ("steps", "decay_steps", "min_lr_ratio", "decay_data")


def decay_start(cfg: dict[str, Any]) -> int | None:
    """First step of the decay phase of a warmup-stable-decay run (None for a whole-run cosine)."""
    decay = int(cfg.get("decay_steps") or 0)
    if decay <= 0:
        return None
    return max(int(cfg["warmup_steps"]), int(cfg["steps"]) - decay)


def data_for_step(cfg: dict[str, Any], step: int) -> dict[str, Any]:
    """The data settings of ``step``: ``data``, with ``decay_data`` on top once the decay has started.

    Why a second mix: the decay phase is where the weights settle, so it is where extra weight on the
    cases the model gets wrong (two-shape scenes) pays most, the way LLM recipes anneal on chosen data.
    """
    start = decay_start(cfg)
    extra = cfg.get("decay_data") or {}
    if extra and start is not None and step >= start:
        return {**cfg.get("data", {}), **extra}
    return cfg.get("data", {})


#: Keys added after checkpoints existed: left out of the digest at these values, so older checkpoints
#: (which trained with exactly these) still resume.
_LATER_KEYS = {key: DEFAULTS[key] for key in ("prediction_type", "loss_weighting", "base", "lora", "init_from",
                                               "anchor_weight", "anchor_noise", "freeze_encoder",
                                               "pixel_loss", "preserve_weight")}


def config_digest(cfg: dict[str, Any]) -> str:
    """Digest of the settings that determine the weights (a checkpoint only resumes the same run)."""
    keep = {k: v for k, v in cfg.items() if k not in ("config_path", "checkpoint_every", "log_every", "num_workers",
                                                      "sample_every", "name", "base_path", *SCHEDULE_KEYS)
            and not (k in _LATER_KEYS and v == _LATER_KEYS[k])}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
