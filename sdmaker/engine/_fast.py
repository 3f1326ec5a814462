"""Speed options for a loaded model: precision, memory format, attention kernel, compilation.

Every option is optional and measured by ``bench/engine.py``; :func:`recommended_options` returns
the defaults the benchmark numbers support on this kind of machine:

* **precision** – bf16 on CPUs with native bf16 dot products (AVX512-BF16 / AMX), where a torch bf16
  GEMM runs well above fp32 (measured ~2.5x on a 2-core Zen 5); fp32 elsewhere on CPU (emulated
  bf16 is slower than fp32); fp16 on CUDA. Precision is chosen at load time
  (``load_model(dtype=...)``) so weights are read once, in the right dtype, without an extra copy.
* **SDPA** – PyTorch's fused ``scaled_dot_product_attention`` processor (diffusers' default under
  torch 2); ``sdpa=False`` selects the classic baddbmm+softmax processor, for comparison.
* **channels-last** – NHWC for convolutions (oneDNN / cuDNN prefer it); measured, off by default
  on CPU unless the benchmark shows it pays.
* **torch.compile** – Inductor on the UNet; it costs minutes of compilation on 2 cores, so it only
  pays for long-lived servers; :func:`apply_speed_options` reports the compile time it spent.
* **DeepCache** – reuse of deep UNet features across steps; lives in the loop
  (:mod:`sdmaker.engine._loop`; per request, or forced by :func:`~sdmaker.engine.generate_fast`), configured here only as numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sdmaker.engine._device import cpu_has_native_bf16
from sdmaker.engine._loader import LoadedModel
from sdmaker.errors import ConfigError

__all__ = ["SpeedOptions", "apply_speed_options", "recommended_dtype", "recommended_options"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    """What to change on a loaded model. The defaults change nothing."""

    sdpa: bool = True
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    deep_cache_interval: int = 0
    deep_cache_branch: int = 2

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def recommended_dtype(device: str = "cpu") -> str:
    """The dtype to load with: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."""
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def recommended_options() -> SpeedOptions:
    """The speed options sdmaker turns on by default (see ``bench/results.json`` for the numbers)."""
    return SpeedOptions(sdpa=True, channels_last=False, compile=False, deep_cache_interval=0)


def _set_attention(module: Any, sdpa: bool) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def apply_speed_options(model: LoadedModel, options: SpeedOptions) -> dict[str, float]:
    """Apply ``options`` to ``model`` in place; returns timings (``compile_s`` when compiling).

    Compilation is lazy in torch: the returned ``compile_s`` covers one warm-up UNet call at the
    model's native size, which is where Inductor spends its time.
    """
    if options.deep_cache_interval < 0:
        raise ConfigError("deep_cache_interval must be >= 0", field="deep_cache_interval",
                          value=options.deep_cache_interval)
    pipe = model.pipeline
    report: dict[str, float] = {}
    with model.lock:
        unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
        _set_attention(unet, options.sdpa)
        _set_attention(pipe.vae, options.sdpa)
        fmt = torch.channels_last if options.channels_last else torch.contiguous_format
        unet.to(memory_format=fmt)
        pipe.vae.to(memory_format=fmt)
        if options.deep_cache_interval > 1:
            from sdmaker.engine._deepcache import check_deepcache_support

            check_deepcache_support(unet)
        if options.compile and not hasattr(pipe.unet, "_orig_mod"):
            started = time.perf_counter()
            pipe.unet = torch.compile(unet, mode=options.compile_mode, dynamic=False)
            _warm_up(model)
            report["compile_s"] = time.perf_counter() - started
            logger.info("compiled the UNet of %s in %.1fs", model.name, report["compile_s"])
        elif not options.compile and hasattr(pipe.unet, "_orig_mod"):
            pipe.unet = unet
    return report


def _warm_up(model: LoadedModel) -> None:
    pipe = model.pipeline
    unet = pipe.unet
    cfg = unet.config
    size = int(cfg.sample_size)
    dtype = pipe.text_encoder.dtype
    device = torch.device(model.placement.device)
    sample = torch.zeros(2, cfg.in_channels, size, size, dtype=dtype, device=device)
    seq = int(getattr(pipe.tokenizer, "model_max_length", 77))
    embeds = torch.zeros(2, seq, cfg.cross_attention_dim, dtype=dtype, device=device)
    with torch.inference_mode():
        unet(sample, torch.tensor([999.0, 999.0], device=device), encoder_hidden_states=embeds, return_dict=False)
