"""Device and dtype selection.

CUDA runs fp16 (what the seed uses on its T4). On CPU, ``auto`` is bf16 where the CPU has native bf16
dot products (AVX512-BF16 / AMX; measured ~2x on the SD 2.1 UNet step, no loss on the built-in model's
eval) and fp32 elsewhere; fp16 is refused on CPU because most CPU kernels lack it (diffusers issue 3432:
"LayerNormKernelImpl not implemented for 'Half'").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from sdmaker.errors import ConfigError

__all__ = ["SPEED_FLAGS", "Placement", "cpu_flags", "cpu_has_native_bf16", "resolve_placement"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a pipeline runs."""

    device: str
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.dtype]


@cache
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or AMX (bf16 matmuls then run at >= fp32 speed)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: The SIMD/matrix flags that decide which precision and kernels are fast (bench rows name them).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> list[str]:
    """This CPU's :data:`SPEED_FLAGS` (from /proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SPEED_FLAGS if f in have]
    except OSError:
        pass
    return []


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """Resolve ``auto`` choices; refuse combinations that cannot work (fp16 on CPU, CUDA without a GPU)."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device={device!r} is not valid; allowed: auto, cpu, cuda", field="device", value=device)
    if dtype not in ("auto", *_DTYPES):
        raise ConfigError(f"dtype={dtype!r} is not valid; allowed: auto, fp32, bf16, fp16", field="dtype", value=dtype)
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        raise ConfigError("device='cuda' was requested but no CUDA GPU is available; use --device cpu",
                          field="device", value=device)
    if dtype == "auto":
        # Chosen by bench numbers: bf16 runs the SD 2.1 UNet step ~2x faster than fp32 on CPUs with native
        # bf16 and leaves the built-in model's eval unchanged (75.1 vs 75.0 points, 128 prompts); CPUs without
        # it emulate bf16 slower than fp32. SDMAKER_DTYPE=fp32 / --dtype fp32 turns it off.
        dtype = "fp16" if device.startswith("cuda") else ("bf16" if cpu_has_native_bf16() else "fp32")
    if device == "cpu" and dtype == "fp16":
        raise ConfigError("dtype='fp16' is not supported on CPU (most CPU kernels lack fp16); use fp32 or bf16",
                          field="dtype", value=dtype)
    if device == "cpu" and dtype == "bf16" and not cpu_has_native_bf16():
        logger.warning("bf16 requested but this CPU has no native bf16 (avx512_bf16/amx); it will be slow")
    return Placement(device=device, dtype=_DTYPES[dtype])
