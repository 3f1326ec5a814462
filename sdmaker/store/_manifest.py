"""What the store knows about one model: its files, digest, architecture and defaults.

The manifest is a JSON file per model (``manifests/<name>.json``). Writing it is the commit point of
an import: until it exists, nothing of the model is visible. Architecture facts are read from the
diffusers config files at import time, so ``model show`` and ``model list`` never load weights.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from sdmaker.errors import InvalidRequestError
from sdmaker.files import MODEL_CARD_DEFAULT_KEYS, MODEL_CARD_FILE, weights_digest_of_hashes

__all__ = ["NAME_PATTERN", "Architecture", "LoraInfo", "ManifestFile", "ModelManifest", "Tuning", "read_architecture",
           "validate_name"]

#: Store names are file names: no separators, no leading dot, so they can never escape ``manifests/``.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")



def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid store name, else raise ``InvalidRequestError`` naming the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name.endswith(".json"):
        raise InvalidRequestError(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit",
            field="name", value=name, allowed=NAME_PATTERN.pattern,
        )
    return name


class ManifestFile(BaseModel):
    """One file of a model: its path inside the model folder (posix), sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


class Architecture(BaseModel):
    """Architecture facts read from the diffusers configs (``None`` where a config is missing)."""

    pipeline_class: str | None = None
    unet_block_out_channels: list[int] | None = None
    cross_attention_dim: int | None = None
    sample_size: int | None = None
    in_channels: int | None = None
    vae_scale_factor: int | None = None
    text_encoder_class: str | None = None
    tokenizer_class: str | None = None
    scheduler_class: str | None = None

    @property
    def native_size(self) -> int | None:
        """Pixel resolution the UNet was built for (latent sample size x VAE scale factor)."""
        if self.sample_size is None or self.vae_scale_factor is None:
            return None
        return self.sample_size * self.vae_scale_factor


class Tuning(BaseModel):
    """A tuned recipe written into the model's ``sdmaker.json`` by ``sdmaker model tune``.

    ``card_before`` is the model card as imported (None: the model had none), kept so that
    ``model tune --reset`` restores the exact files, and so the model's digest, it had before.
    ``record`` is what the tuner measured (recipe, reference, metric, threshold, every candidate).
    """

    card_before: ManifestFile | None = None
    record: dict[str, Any] = Field(default_factory=dict)


class LoraInfo(BaseModel):
    """What ``sdmaker model import`` read from a LoRA adapter (kind ``lora``): enough to check it against a base.

    ``file``: the adapter's one file in the snapshot; ``sha256``: its digest (the digest recipes quote).
    ``base``/``base_digest``: the model it was imported for (None: not named; it is then checked by layer
    shapes against whatever model serves it). ``base_weights_digest``: that model's weights digest
    (:func:`sdmaker.files.weights_digest`: its UNet and text conditioning, not its model card), which is
    what a serving model must match, so tuning the base (a new card, a new digest) keeps its adapters.
    Adapters imported before it existed have only ``base_digest``; they are compared by the full digest,
    as they always were. ``target_modules``: normalised UNet module names.
    """

    file: str
    sha256: str
    layout: str
    rank: int
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    base: str | None = None
    base_digest: str | None = None
    base_weights_digest: str | None = None


class ModelManifest(BaseModel):
    """A stored model. ``digest`` equals :func:`sdmaker.files.tree_digest` of its files."""

    name: str
    digest: str
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    files: list[ManifestFile]
    total_size: int
    architecture: Architecture = Field(default_factory=Architecture)
    prediction_type: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    source: str | None = None
    sdmaker_version: str | None = None
    tuning: Tuning | None = None
    #: ``model`` (a diffusers pipeline folder) or ``lora`` (an adapter for one; see ``lora``)
    kind: str = "model"
    lora: LoraInfo | None = None

    @property
    def weights_digest(self) -> str:
        """The digest of the files a LoRA adapter depends on (:func:`sdmaker.files.weights_digest`), from
        the recorded file hashes (nothing is read)."""
        return weights_digest_of_hashes((f.path, f.sha256) for f in self.files)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelManifest:
        return cls.model_validate_json(text)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _class_of(model_index: dict[str, Any], component: str) -> str | None:
    entry = model_index.get(component)
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def read_architecture(root: Path) -> tuple[Architecture, str | None, dict[str, Any]]:
    """Architecture, prediction type and request defaults of the model folder ``root``.

    Only JSON is read (never weights), so this is cheap and never unpickles anything.
    """
    index = _read_json(root / "model_index.json")
    unet = _read_json(root / "unet" / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
    vae_blocks = vae.get("block_out_channels")
    arch = Architecture(
        pipeline_class=index.get("_class_name") if isinstance(index.get("_class_name"), str) else None,
        unet_block_out_channels=[int(c) for c in unet["block_out_channels"]]
        if isinstance(unet.get("block_out_channels"), list) else None,
        cross_attention_dim=unet.get("cross_attention_dim") if isinstance(unet.get("cross_attention_dim"), int)
        else None,
        sample_size=unet.get("sample_size") if isinstance(unet.get("sample_size"), int) else None,
        in_channels=unet.get("in_channels") if isinstance(unet.get("in_channels"), int) else None,
        vae_scale_factor=2 ** (len(vae_blocks) - 1) if isinstance(vae_blocks, list) and vae_blocks else None,
        text_encoder_class=_class_of(index, "text_encoder"),
        tokenizer_class=_class_of(index, "tokenizer"),
        scheduler_class=_class_of(index, "scheduler"),
    )
    prediction = scheduler.get("prediction_type")
    prediction_type = str(prediction) if isinstance(prediction, str) else ("epsilon" if scheduler else None)
    card = _read_json(root / MODEL_CARD_FILE)
    raw_defaults = card.get("defaults", {})
    defaults = ({k: v for k, v in raw_defaults.items() if k in MODEL_CARD_DEFAULT_KEYS}
                if isinstance(raw_defaults, dict) else {})
    return arch, prediction_type, defaults
