"""Load a LoRA adapter trained by ``sdmaker train lora`` onto a loaded model, for ``sdmaker eval --lora``.

The adapter is in diffusers' LoRA layout (``pytorch_lora_weights.safetensors``), so diffusers'
``load_lora_weights`` reads it; it is then fused into the UNet at ``scale`` (weights W + scale x B A) and the
adapter layers are removed, so the engine's own loop (DeepCache, step batching) runs on a plain UNet.
Per-request adapters without fusing are the serving side's business (``loras`` request field).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sdmaker.errors import ConfigError, SdmakerError

__all__ = ["LORA_WEIGHTS_FILE", "fuse_lora", "lora_facts"]

logger = logging.getLogger(__name__)

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def lora_facts(path: Path) -> dict[str, Any]:
    """What ``sdmaker-lora.json`` beside the adapter says (base digest, rank, concept); {} when absent."""
    from sdmaker.training._trainer import LORA_FILE

    facts = Path(path) / LORA_FILE
    return json.loads(facts.read_text()) if facts.is_file() else {}


def fuse_lora(model: Any, path: Path, *, scale: float = 1.0) -> dict[str, Any]:
    """Fuse the adapter at ``path`` (a folder or its ``.safetensors``) into ``model``'s UNet; return its facts.

    A model whose weights digest differs from the adapter's recorded one (adapters exported before weights
    digests: whose digest differs from the recorded base digest) is still loaded (the architecture may
    match), with a warning: the eval report then says which base it ran on.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / LORA_WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(f"{weights} does not exist: --lora takes a LoRA folder (holding {LORA_WEIGHTS_FILE}) "
                          "or the .safetensors file", field="lora", value=str(path))
    facts = lora_facts(folder)
    _warn_other_base(model, facts)
    pipe = model.pipeline
    with model.lock:
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name="sdmaker_eval")
        pipe.fuse_lora(lora_scale=float(scale), adapter_names=["sdmaker_eval"])
        pipe.unload_lora_weights()
    return {**facts, "path": str(weights), "scale": float(scale)}


def _warn_other_base(model: Any, facts: dict[str, Any]) -> None:
    """Warn when ``facts`` (``sdmaker-lora.json``) name another base than ``model``: by weights digest (a
    tuned model card does not matter), or by full digest for adapters that record only that."""
    from sdmaker.files import weights_digest

    weights = facts.get("base_weights_digest")
    path = getattr(model, "path", None)
    if weights and path is not None:
        try:
            ours = weights_digest(Path(path))
        except (OSError, SdmakerError):
            return
        if weights != ours:
            logger.warning("the adapter was trained on a base of weights digest %s, not on this model's (%s)",
                           weights, ours)
        return
    base = facts.get("base_digest")
    if base and base != getattr(model, "digest", None):
        logger.warning("the adapter was trained on base %s, not on this model (%s)", base, model.digest)
