"""Load a diffusers Stable Diffusion folder into a ready-to-run :class:`LoadedModel`.

Only local folders are loaded here; turning a store name, a ``model.tar.gz``, an ``s3://`` URI or a
hub id into a folder is the store's job (``sdmaker.store.resolve_model``). Weights are read with
safetensors (memory-mapped, no unpickling); pickle weights are refused unless ``allow_pickle``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdmaker.engine._device import Placement, resolve_placement
from sdmaker.engine._preview import read_latent_preview
from sdmaker.engine._schedulers import scheduler_name_of
from sdmaker.errors import ModelFormatError, ModelNotFoundError, PickleRefusedError
from sdmaker.files import (  # the one pickle rule, digest and model card
    MODEL_CARD_DEFAULT_KEYS,
    MODEL_CARD_FILE,
    PICKLE_SUFFIXES,
    find_pickle_weights,
    tree_digest,
)

__all__ = ["MODEL_CARD_FILE", "PICKLE_SUFFIXES", "LoadedModel", "card_dtype", "find_pickle_weights", "load_model",
           "read_model_card", "read_model_defaults"]

logger = logging.getLogger(__name__)

_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class LoadedModel:
    """A pipeline in memory plus what requests need to know about it.

    The diffusers pipeline keeps per-call state (its scheduler), so calls are serialised by ``lock``;
    concurrency comes from worker processes and from the step-level batcher, not from threads sharing
    one pipeline.
    """

    pipeline: Any
    path: Path
    name: str
    digest: str
    placement: Placement
    defaults: dict[str, Any] = field(default_factory=dict)
    prediction_type: str = "epsilon"
    default_scheduler: str | None = None
    load_seconds: float = 0.0
    tuned: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: approx-preview factors (:class:`~sdmaker.engine.LatentPreview`) kept with the model; fitted on first use if None
    latent_preview: Any = field(default=None, repr=False)
    #: the :class:`~sdmaker.engine.AdapterLibrary` resolving requests' ``loras`` (None: the default store's, on first use)
    adapters: Any = field(default=None, repr=False)
    #: the :class:`~sdmaker.engine.StepCompiler` of a long-lived server (compiled CFG steps), or None: eager
    step_compiler: Any = field(default=None, repr=False)

    @property
    def native_size(self) -> int:
        """The resolution the UNet was trained at (sample_size x VAE scale factor)."""
        unet = self.pipeline.unet
        return int(unet.config.sample_size) * int(self.pipeline.vae_scale_factor)

    def describe(self) -> dict[str, Any]:
        unet_cfg = self.pipeline.unet.config
        return {
            "name": self.name,
            "path": str(self.path),
            "digest": self.digest,
            "device": self.placement.device,
            "dtype": self.placement.dtype_name,
            "prediction_type": self.prediction_type,
            "default_scheduler": self.default_scheduler,
            "native_size": self.native_size,
            "cross_attention_dim": unet_cfg.cross_attention_dim,
            "text_encoder": type(self.pipeline.text_encoder).__name__,
            "defaults": self.defaults,
            "tuned": self.tuned is not None,
        }


def read_model_card(root: Path) -> dict[str, Any]:
    """The model's ``sdmaker.json`` as a dict (empty when absent): ``defaults``, ``prompts``, ``dtype``, ``tuned``."""
    card = Path(root) / MODEL_CARD_FILE
    if not card.is_file():
        return {}
    try:
        data = json.loads(card.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{card}: not valid JSON ({exc})", model=str(root)) from exc
    return data if isinstance(data, dict) else {}


def read_model_defaults(root: Path) -> dict[str, Any]:
    """The model's recommended request defaults from ``sdmaker.json`` (empty when absent).

    After ``sdmaker model tune`` these include the tuned scheduler, steps and DeepCache interval.
    """
    defaults = read_model_card(root).get("defaults", {})
    if not isinstance(defaults, dict):
        return {}
    return {k: v for k, v in defaults.items() if k in MODEL_CARD_DEFAULT_KEYS}


def card_dtype(card: dict[str, Any], dtype: str) -> str:
    """The dtype to load with: ``dtype`` unless it is ``auto`` and the model card's tuned precision says fp32.

    ``model tune`` writes ``"dtype": "fp32"`` when the machine's fast precision (bf16 on CPU, fp16 on
    CUDA) changed the model's pictures; any other tuned precision is what ``auto`` already picks where it
    is fast, and ``auto`` still decides per machine (a CPU without native bf16 runs fp32). An explicit
    ``--dtype`` / ``SDMAKER_DTYPE`` always wins.
    """
    if dtype == "auto" and card.get("dtype") == "fp32":
        return "fp32"
    return dtype


def _check_folder(root: Path, allow_pickle: bool) -> None:
    if not root.exists():
        raise ModelNotFoundError(f"model folder {root} does not exist", model=str(root))
    if not (root / "model_index.json").is_file():
        raise ModelFormatError(
            f"{root} is not a diffusers model folder: model_index.json is missing "
            "(expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
            model=str(root),
        )
    missing = [c for c in _COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise ModelFormatError(f"{root}: missing component folder(s): {', '.join(missing)}", model=str(root))
    pickles = find_pickle_weights(root)
    has_safetensors = any(root.rglob("*.safetensors"))
    if pickles and not allow_pickle and not has_safetensors:
        raise PickleRefusedError(
            f"{root} holds pickle weights ({', '.join(map(str, pickles[:3]))}); loading them can run "
            "arbitrary code. Convert them to safetensors, or pass --allow-pickle if you trust the source.",
            model=str(root), files=[str(p) for p in pickles],
        )


def load_model(
    path: Path,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    digest: str | None = None,
) -> LoadedModel:
    """Load the Stable Diffusion 1.x/2.x folder at ``path``.

    Args:
        path: a diffusers folder (``model_index.json`` + components); may contain ``code/`` (ignored here).
        name: display name (store name); defaults to the folder name.
        device / dtype: see :func:`~sdmaker.engine.resolve_placement`.
        allow_pickle: also accept ``.bin``/``.ckpt`` weights (runs unpickling; trusted sources only).
        digest: known content digest (store models have it); computed from the files otherwise.
    """
    from diffusers import StableDiffusionPipeline  # heavy import, deferred to the first load
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # progress belongs to the caller (on_step callbacks)

    path = Path(path)
    _check_folder(path, allow_pickle)
    card = read_model_card(path)
    placement = resolve_placement(device, card_dtype(card, dtype))
    started = time.perf_counter()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            dtype=placement.dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            use_safetensors=not allow_pickle,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFormatError(f"could not load {path} as a Stable Diffusion pipeline: {exc}",
                               model=str(path)) from exc
    pipe = pipe.to(placement.device)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - started
    try:
        latent_preview = read_latent_preview(path)
    except ModelFormatError as exc:  # previews are optional: fitted again on first use
        logger.warning("%s", exc.message)
        latent_preview = None
    prediction_type = str(pipe.scheduler.config.get("prediction_type", "epsilon"))
    model = LoadedModel(
        pipeline=pipe,
        path=path,
        name=name or path.name,
        digest=digest or tree_digest(path),
        placement=placement,
        defaults=read_model_defaults(path),
        prediction_type=prediction_type,
        default_scheduler=scheduler_name_of(pipe.scheduler),
        load_seconds=load_seconds,
        latent_preview=latent_preview,
        tuned=card["tuned"] if isinstance(card.get("tuned"), dict) else None,
    )
    logger.info("loaded %s (%s, %s, %s) in %.2fs", model.name, prediction_type, placement.device,
                placement.dtype_name, load_seconds)
    return model

