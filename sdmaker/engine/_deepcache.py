"""DeepCache-style feature reuse for the Stable Diffusion UNet (Ma et al., 2023, arXiv 2312.00858).

Adjacent denoising steps produce nearly the same deep UNet features. DeepCache runs the whole UNet
on every ``interval``-th step and, on the steps in between, only the shallowest skip branch: the
first ``branch`` down units (``conv_in`` is unit 0) and the last ``branch`` up units, which receive
the deep feature cached at the last full step. The UNet is viewed here as a flat list of *units*:

* down units: ``conv_in``, then per down block one unit per (resnet, attention) pair and one per
  downsampler; each unit yields one skip tensor;
* up units: per up block one unit per (resnet, attention) pair, each consuming one skip tensor in
  reverse order; a block's upsampler runs after its last unit.

The full pass below applies exactly the operations of ``UNet2DConditionModel.forward`` in the same
order (a test checks they agree), so a cache interval of 1 equals the plain UNet. Only the block
types of SD 1.x/2.x UNets are supported; anything else raises :class:`ConfigError` up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdmaker.errors import ConfigError

__all__ = ["UNetUnits", "check_deepcache_support"]

_SUPPORTED_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}


def check_deepcache_support(unet: Any) -> None:
    """Raise :class:`ConfigError` unless ``unet`` is a plain SD-style UNet the unit view understands."""
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile wrapper
    cfg = unet.config
    blocks = [type(b).__name__ for b in (*unet.down_blocks, *unet.up_blocks)]
    unsupported = sorted(set(blocks) - _SUPPORTED_BLOCKS)
    extras = [k for k in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim", "encoder_hid_dim")
              if cfg.get(k) is not None]
    if unsupported or extras or cfg.get("center_input_sample"):
        raise ConfigError(
            f"deep_cache supports SD 1.x/2.x UNets only; this UNet has blocks {unsupported} / options {extras}",
            field="deep_cache", value=f"{unsupported}{extras}")


@dataclass
class _Up:
    resnet: Any
    attn: Any
    upsamplers: Any  # set on the last unit of a block that upsamples


class UNetUnits:
    """A UNet split into down/up units so a pass can stop at a shallow skip branch."""

    def __init__(self, unet: Any) -> None:
        check_deepcache_support(unet)
        self.unet = getattr(unet, "_orig_mod", unet)
        self.down: list[tuple[str, Any, Any]] = [("conv", self.unet.conv_in, None)]
        for block in self.unet.down_blocks:
            attns = getattr(block, "attentions", None)
            for i, resnet in enumerate(block.resnets):
                self.down.append(("pair", resnet, attns[i] if attns is not None else None))
            if block.downsamplers is not None:
                self.down.append(("downsample", block.downsamplers, None))
        self.up: list[_Up] = []
        for block in self.unet.up_blocks:
            attns = getattr(block, "attentions", None)
            n = len(block.resnets)
            for i, resnet in enumerate(block.resnets):
                self.up.append(_Up(resnet, attns[i] if attns is not None else None,
                                   block.upsamplers if i == n - 1 else None))
        if len(self.down) != len(self.up):
            raise ConfigError(f"UNet has {len(self.down)} skip tensors but {len(self.up)} up units",
                              field="deep_cache")

    @property
    def units(self) -> int:
        return len(self.down)

    def _embed(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb

    @staticmethod
    def _attn(attn: Any, h: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        return attn(h, encoder_hidden_states=ehs, cross_attention_kwargs=None, attention_mask=None,
                    encoder_attention_mask=None, return_dict=False)[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *,
                branch: int, cached: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet output and the deep feature entering up unit ``units - branch``.

        With ``cached`` given, only the shallow branch runs and ``cached`` stands in for the deep part.
        """
        if not 1 <= branch < self.units:
            raise ConfigError(f"deep_cache branch={branch} must be in 1..{self.units - 1}", field="deep_cache_branch",
                              value=branch)
        unet = self.unet
        n = self.units
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])
        emb = self._embed(sample, timestep)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
        skips: list[torch.Tensor] = []
        h = sample
        stop = branch if cached is not None else n
        for kind, mod, attn in self.down[:stop]:
            if kind == "conv":
                h = mod(h)
            elif kind == "pair":
                h = mod(h, emb)
                if attn is not None:
                    h = self._attn(attn, h, ehs)
            else:
                for down in mod:
                    h = down(h)
            skips.append(h)
        feature: torch.Tensor
        start = n - branch
        if cached is None:
            if unet.mid_block is not None:
                if getattr(unet.mid_block, "has_cross_attention", False):
                    h = unet.mid_block(h, emb, encoder_hidden_states=ehs, attention_mask=None,
                                       cross_attention_kwargs=None, encoder_attention_mask=None)
                else:
                    h = unet.mid_block(h, emb)
            first = 0
        else:
            h = cached
            first = start
        for j in range(first, n):
            if j == start:
                feature = h
            unit = self.up[j]
            h = torch.cat([h, skips[n - 1 - j]], dim=1)
            h = unit.resnet(h, emb)
            if unit.attn is not None:
                h = self._attn(unit.attn, h, ehs)
            if unit.upsamplers is not None:
                size = skips[n - 2 - j].shape[2:] if forward_upsample_size else None
                for up in unit.upsamplers:
                    h = up(h, size)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h), feature
