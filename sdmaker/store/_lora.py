"""LoRA adapter files: their key layouts, read from the safetensors header alone (no torch).

A LoRA adds ``scale * alpha / rank * B(A(x))`` to the output of some of the UNet's ``nn.Linear`` /
``nn.Conv2d`` layers. Three key layouts are in the wild for the same numbers; all map to one normalised
description (:class:`LoraLayout`): the UNet module name (``down_blocks.1.attentions.0.transformer_blocks.0.
attn1.to_q``, as ``unet.named_modules()`` says it), the keys of the A (down) and B (up) tensors, and alpha.

* ``peft``: what ``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=get_peft_model_state_dict(
  unet))`` writes: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, the PEFT config (``r``,
  ``lora_alpha``, ``alpha_pattern``) in the ``lora_adapter_metadata`` header entry when diffusers saved it
  (else alpha = rank, as diffusers assumes).
* ``diffusers-old``: ``[unet.]<module>.lora.down.weight`` / ``lora.up.weight``, or the attention-processor
  form ``<block>.processor.to_q_lora.down.weight``; optional ``<module>.alpha`` tensors.
* ``kohya``: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. The
  underscored names are mapped back with the base UNet's module names when known, else by SD UNet tokens.

Only UNet layers are served: a file with text-encoder layers (``text_encoder.``, ``lora_te_``) or other
adapter kinds (DoRA, LoKr, LoHa) is refused by name, never half-applied.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdmaker.errors import ModelFormatError

__all__ = ["LORA_FILE", "LoraLayer", "LoraLayout", "check_lora_base", "kohya_module_name", "parse_lora", "read_header",
           "read_lora", "unet_weight_shapes"]

#: The adapter's file name inside its store snapshot (diffusers' own name: ``load_lora_weights(dir)`` reads it).
LORA_FILE = "pytorch_lora_weights.safetensors"

#: Underscore-joined tokens of SD UNet module names, longest first (kohya names replace every "." by "_").
_TOKENS = sorted({
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "transformer_blocks", "attn1", "attn2",
    "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj", "proj_in", "proj_out", "conv1", "conv2",
    "conv_shortcut", "time_emb_proj", "downsamplers", "upsamplers", "conv", "conv_in", "conv_out",
    "time_embedding", "linear_1", "linear_2", "norm", "norm1", "norm2", "norm3", "add_embedding",
}, key=len, reverse=True)

_PEFT = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_OLD = re.compile(r"^(?P<m>.+)\.lora\.(?P<ud>down|up)\.weight$")
_PROC = re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<m>[A-Za-z0-9_]+)\.(?:lora_(?P<ud>down|up)\.weight|(?P<alpha>alpha))$")
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")

#: bytes and struct code of the scalar dtypes an ``alpha`` tensor may have
_SCALAR = {"F32": (4, "<f"), "F64": (8, "<d"), "F16": (2, "<e"), "I64": (8, "<q"), "I32": (4, "<i")}


@dataclass(frozen=True)
class LoraLayer:
    """One adapted UNet layer: its module name, the A/B tensor keys and shapes, and its alpha (None: = rank)."""

    module: str
    down: str
    up: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    @property
    def factor(self) -> float:
        """``alpha / rank``: what B(A(x)) is multiplied by before the request's scale."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass(frozen=True)
class LoraLayout:
    """A LoRA file, normalised: its key layout, its layers by UNet module name, and header facts."""

    layout: str
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def alpha(self) -> float | None:
        """The alpha shared by every layer (None when the layers differ)."""
        alphas = {layer.alpha if layer.alpha is not None else float(layer.rank) for layer in self.layers.values()}
        return alphas.pop() if len(alphas) == 1 else None

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.layers)


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensors (name -> ``{"dtype", "shape", "data_offsets"}``) and ``__metadata__`` of a safetensors file.

    Call :func:`sdmaker.store.check_safetensors`-checked files only (this trusts the header's sanity).
    """
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n).decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in metadata.items()}


def _scalar(path: Path, header: dict[str, dict[str, Any]], key: str) -> float:
    info = header[key]
    size_code = _SCALAR.get(info["dtype"])
    if size_code is None or len(info["shape"]) > 1 or (info["shape"] and info["shape"][0] != 1):
        raise ModelFormatError(f"{path.name}: {key} must be one number (F32/F16/F64/I32/I64), got "
                               f"{info['dtype']} {info['shape']}", path=str(path), key=key)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n + info["data_offsets"][0])
        (value,) = struct.unpack(size_code[1], fh.read(size_code[0]))
    return float(value)


def kohya_module_name(underscored: str, unet_modules: Collection[str] | None = None) -> str:
    """The dotted module name of a kohya ``lora_unet_<name>`` (``down_blocks_0_attentions_0_..._to_q``).

    With the base UNet's module names the mapping is exact; otherwise SD UNet name tokens are matched greedily.
    """
    if unet_modules is not None:
        exact = {m.replace(".", "_"): m for m in unet_modules}
        if underscored in exact:
            return exact[underscored]
    parts: list[str] = []
    rest = underscored
    while rest:
        for token in _TOKENS:
            if rest == token or rest.startswith(token + "_"):
                parts.append(token)
                rest = rest[len(token) + 1:]
                break
        else:
            digits = re.match(r"^(\d+)(?:_|$)", rest)
            if digits is None:
                raise ModelFormatError(f"kohya layer name lora_unet_{underscored} is not a diffusers UNet module "
                                       "name (LDM-style names such as input_blocks_1_1 are not supported)",
                                       key=f"lora_unet_{underscored}")
            parts.append(digits.group(1))
            rest = rest[digits.end():]
    return ".".join(parts)


def _peft_alphas(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float], bool, bool]:
    """(lora_alpha, alpha_pattern, use_rslora, use_dora) of the UNet from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False, False
    try:
        data = json.loads(raw)
    except ValueError:
        return None, {}, False, False
    if not isinstance(data, dict):
        return None, {}, False, False
    config = {k.removeprefix("unet."): v for k, v in data.items() if not k.startswith("text_encoder")}
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    return (float(alpha) if isinstance(alpha, (int, float)) else None,
            {str(k): float(v) for k, v in pattern.items()} if isinstance(pattern, dict) else {},
            bool(config.get("use_rslora")), bool(config.get("use_dora")))


def parse_lora(path: Path, *, unet_modules: Collection[str] | None = None) -> LoraLayout:
    """Read the LoRA file ``path``'s header into a :class:`LoraLayout`; ``ModelFormatError`` naming what is wrong."""
    path = Path(path)
    header, metadata = read_header(path)
    if not header:
        raise ModelFormatError(f"{path.name} holds no tensors", path=str(path))
    downs: dict[str, str] = {}
    ups: dict[str, str] = {}
    alphas: dict[str, float] = {}
    layouts: set[str] = set()
    for key in header:
        name = key.removeprefix("unet.")
        if key.startswith(("text_encoder", "lora_te", "te_", "te1_", "te2_")):
            raise ModelFormatError(f"{path.name} adapts the text encoder ({key}); sdmaker serves UNet LoRAs only. "
                                   "Save the UNet layers alone (save_lora_weights(dir, unet_lora_layers=...)).",
                                   path=str(path), key=key)
        if m := _PEFT.match(name):
            layouts.add("peft")
            (downs if m["ab"] == "A" else ups)[m["m"]] = key
        elif m := _PROC.match(name):
            layouts.add("diffusers-old")
            module = f"{m['m']}.{m['p']}" + (".0" if m["p"] == "to_out" else "")
            (downs if m["ud"] == "down" else ups)[module] = key
        elif m := _OLD.match(name):
            layouts.add("diffusers-old")
            (downs if m["ud"] == "down" else ups)[m["m"]] = key
        elif m := _KOHYA.match(key):
            layouts.add("kohya")
            module = kohya_module_name(m["m"], unet_modules)
            if m["alpha"]:
                alphas[module] = _scalar(path, header, key)
            else:
                (downs if m["ud"] == "down" else ups)[module] = key
        elif m := _ALPHA.match(name):
            alphas[m["m"]] = _scalar(path, header, key)
        else:
            raise ModelFormatError(f"{path.name}: tensor {key!r} is not a LoRA layer sdmaker knows (expected "
                                   "diffusers/PEFT lora_A/lora_B, lora.down/lora.up, or kohya lora_unet_*.lora_down/"
                                   "lora_up/alpha keys; DoRA, LoKr and LoHa are not supported)", path=str(path), key=key)
    if len(layouts) > 1:
        raise ModelFormatError(f"{path.name} mixes key layouts ({', '.join(sorted(layouts))})", path=str(path))
    layout = layouts.pop() if layouts else "unknown"
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired or not downs:
        raise ModelFormatError(f"{path.name}: layer {unpaired[0] if unpaired else '?'} has no matching "
                               f"{'up/B' if unpaired and unpaired[0] in downs else 'down/A'} tensor"
                               if unpaired else f"{path.name} holds no LoRA layers", path=str(path))
    peft_alpha, pattern, rslora, dora = _peft_alphas(metadata)
    if dora:
        raise ModelFormatError(f"{path.name} is a DoRA adapter; sdmaker serves plain LoRA only", path=str(path))
    layers: dict[str, LoraLayer] = {}
    for module in sorted(downs):
        down, up = tuple(header[downs[module]]["shape"]), tuple(header[ups[module]]["shape"])
        if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0] or (len(up) == 4 and up[2:] != (1, 1)):
            raise ModelFormatError(f"{path.name}: layer {module} has down/A {list(down)} and up/B {list(up)}, which "
                                   "are not a low-rank pair (A [r, in(, k, k)], B [out, r(, 1, 1)])",
                                   path=str(path), module=module)
        alpha = alphas.get(module)
        if alpha is None and layout == "peft":
            alpha = next((a for p, a in pattern.items() if re.match(rf"(.*\.)?({p})$", module)), peft_alpha)
            if alpha is not None and rslora:  # rsLoRA scales by alpha / sqrt(r): the same factor as alpha' / r
                alpha = alpha * down[0] ** 0.5
        layers[module] = LoraLayer(module=module, down=downs[module], up=ups[module], down_shape=down, up_shape=up,
                                   alpha=alpha)
    return LoraLayout(layout=layout, layers=layers, metadata=metadata)


def read_lora(path: Path, *, unet_modules: Collection[str] | None = None) -> LoraLayout:
    """:func:`parse_lora` after checking the file is sane safetensors (``ModelFormatError`` otherwise)."""
    from sdmaker.store._safetensors import check_safetensors

    check_safetensors(path)
    return parse_lora(path, unet_modules=unet_modules)


def unet_weight_shapes(unet_dir: Path) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every layer of the diffusers UNet folder ``unet_dir`` (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(Path(unet_dir).glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{unet_dir} holds no .safetensors UNet weights to check a LoRA against",
                               path=str(unet_dir))
    for file in files:
        header, _ = read_header(file)
        for key, info in header.items():
            if key.endswith(".weight"):
                shapes[key.removesuffix(".weight")] = tuple(info["shape"])
    return shapes


def check_lora_base(layout: LoraLayout, shapes: Mapping[str, tuple[int, ...]], *, base: str) -> None:
    """Refuse ``layout`` unless every layer names a module of the base UNet with matching shapes.

    ``shapes``: :func:`unet_weight_shapes` of the base (or a loaded UNet's). ``base`` names it in the message.
    """
    for layer in layout.layers.values():
        weight = shapes.get(layer.module)
        if weight is None:
            raise ModelFormatError(f"LoRA layer {layer.module} is not a layer of {base}'s UNet: this adapter was "
                                   "trained for another base model", module=layer.module, base=base)
        out, inp = layer.up_shape[0], layer.down_shape[1]
        kernel_ok = (len(weight) == len(layer.down_shape) == 2
                     or len(weight) == len(layer.down_shape) == 4 and layer.down_shape[2:] == weight[2:]
                     or len(weight) == 4 and weight[2:] == (1, 1) and len(layer.down_shape) == 2)  # 1x1 conv as linear
        if weight[0] != out or weight[1] != inp or not kernel_ok:
            raise ModelFormatError(f"LoRA layer {layer.module} (down {list(layer.down_shape)}, up "
                                   f"{list(layer.up_shape)}) does not fit {base}'s layer of weight {list(weight)}: "
                                   "this adapter was trained for another base model", module=layer.module, base=base)
