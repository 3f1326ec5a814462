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

__all__ = ["DEFAULTS", "LOSS_WEIGHTINGS", "PREDICTION_TYPES", "SCHEDULE_KEYS", "config_digest", "data_for_step", "decay_start", "load_config", "require_trained_vae"]

DEFAULTS: dict[str, Any] = {
    "kind": "unet",  # vae | unet
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
    "vae": None,  # unet: folder of the trained VAE (relative to the config file or absolute)
    "max_length": 32,
}
_KINDS = ("vae", "unet")
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
    if cfg["kind"] == "unet":
        if not cfg["vae"]:
            raise ConfigError("a unet config needs 'vae': the folder of the trained VAE", field="vae")
        cfg["vae"] = str(Path(cfg["vae"]).resolve())
    cfg["config_path"] = str(path.resolve())
    return cfg


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
_LATER_KEYS = {key: DEFAULTS[key] for key in ("prediction_type", "loss_weighting")}


def config_digest(cfg: dict[str, Any]) -> str:
    """Digest of the settings that determine the weights (a checkpoint only resumes the same run)."""
    keep = {k: v for k, v in cfg.items() if k not in ("config_path", "checkpoint_every", "log_every", "num_workers",
                                                      "sample_every", "name", *SCHEDULE_KEYS)
            and not (k in _LATER_KEYS and v == _LATER_KEYS[k])}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
