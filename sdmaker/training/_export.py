"""Package trained VAE + UNet as the built-in model's committed files (fp16 safetensors + configs).

Writes ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``, ``sdmaker.json`` (recommended request
defaults) and ``README.md`` (model card) to ``dest`` -- everything except the frozen MiniLM text encoder
and tokenizer, which :func:`sdmaker.models.assemble_builtin` copies from the installed package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdmaker.files import MODEL_CARD_FILE, staged_dir

__all__ = ["DEFAULT_SETTINGS", "check_export_dest", "export_builtin", "tune_prompts"]

#: Recommended request defaults of the built-in model (what ``sdmaker eval`` measures by default).
DEFAULT_SETTINGS: dict[str, Any] = {"height": 64, "width": 64, "num_inference_steps": 10, "guidance_scale": 2.5,
                                    "scheduler": "dpmpp_2m", "deep_cache_interval": 2}
_KEEP = ("model_index.json", "unet", "vae", "scheduler")


def tune_prompts(n: int = 16) -> list[str]:
    """The model's own prompt set for ``sdmaker model tune`` (the card's ``prompts``): in-domain captions drawn
    with another seed than the eval set's, so tuning never picks a recipe on the prompts eval reports on."""
    from sdmaker.training._eval import EVAL_SEED, eval_prompts

    return [item.prompt for item in eval_prompts(n, EVAL_SEED + 1)]


def check_export_dest(dest: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing, non-empty ``dest`` unless ``overwrite`` (before any weights are loaded)."""
    from sdmaker.errors import ConfigError
    from sdmaker.models import BUILTIN_NAMES, builtin_dir

    if overwrite or not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    resolved = dest.resolve()
    builtin = next((n for n in BUILTIN_NAMES if builtin_dir(n).resolve() == resolved), None)
    what = f"the built-in model {builtin!r} ({dest})" if builtin else f"{dest}, which exists"
    raise ConfigError(f"refusing to overwrite {what}: export to a new --dest folder, or pass --force to "
                      "replace it", field="dest", value=str(dest))


def _prediction_type(unet_dir: Path) -> str:
    """What the trained UNet predicts, from the file the trainer writes beside it (epsilon if absent)."""
    from sdmaker.training._trainer import TRAINING_FILE

    path = unet_dir / TRAINING_FILE
    if not path.is_file():
        return "epsilon"
    return str(json.loads(path.read_text()).get("prediction_type", "epsilon"))


def export_builtin(vae_dir: Path, unet_dir: Path, dest: Path, *, name: str = "mini",
                   defaults: dict[str, Any] | None = None, card: str | None = None,
                   text_model_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write the committed part of a built-in model to ``dest`` (replaced atomically); return ``dest``.

    An existing ``dest`` is replaced only with ``overwrite``: it may be the committed built-in model itself,
    whose weights took hours to train, and an export is one mistyped flag away from it.
    """
    check_export_dest(Path(dest), overwrite=overwrite)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdmaker.training._sampling import build_pipeline

    if text_model_dir is None:
        from sdmaker.engine import minilm_dir

        text_model_dir = minilm_dir()
    from sdmaker.models import TOKENIZER_MAX_LENGTH

    vae = AutoencoderKL.from_pretrained(vae_dir).to(torch.float16)
    unet = UNet2DConditionModel.from_pretrained(unet_dir).to(torch.float16)
    defaults = {**DEFAULT_SETTINGS, **(defaults or {})}
    pipe = build_pipeline(unet, vae, text_model_dir, TOKENIZER_MAX_LENGTH, scheduler=defaults["scheduler"]
                          if defaults["scheduler"] in ("ddim", "ddpm") else "dpmpp_2m",
                          prediction_type=_prediction_type(Path(unet_dir)))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=dest.parent) as work, staged_dir(dest) as staged:
        full = Path(work) / "full"
        pipe.save_pretrained(full, safe_serialization=True)
        for item in _KEEP:
            src = full / item
            if src.is_dir():
                shutil.copytree(src, staged / item)
            else:
                shutil.copy2(src, staged / item)
        from sdmaker.engine import PREVIEW_KEY, fit_latent_preview

        # the cheap preview's factors ship with the model (fitted on the fp32 VAE, as the engine runs it)
        factors = fit_latent_preview(AutoencoderKL.from_pretrained(vae_dir).to(torch.float32))
        (staged / MODEL_CARD_FILE).write_text(json.dumps({"name": name, "defaults": defaults,
                                                          PREVIEW_KEY: factors.to_json(),
                                                          "prompts": tune_prompts()}, indent=2) + "\n")
        if card is not None:
            (staged / "README.md").write_text(card)
        elif (dest / "README.md").is_file():
            shutil.copy2(dest / "README.md", staged / "README.md")
    return dest
