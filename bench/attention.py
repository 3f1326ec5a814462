"""Where the torch UNet step loses to OpenVINO: the self-attention of SD 2.1's first level, measured.

The peers rows show OpenVINO's step 1.1-1.5x faster than ours on the same UNet. This module measures the part
the torch profiler pointed at: the 4096-token self-attention of the 512² step (batch 2 for CFG, 5 heads of 64).
It times the eager bf16 step with every ``scaled_dot_product_attention`` call timed inside it (the share of the
step), then that attention shape alone through each attention path torch offers on a CPU, as a fraction of the
machine's bf16 GEMM peak measured in the same run:

- torch's SDPA (its CPU flash kernel: what diffusers calls, what the compiled step keeps);
- ``torch.compile`` of SDPA, and of ``flex_attention`` (Inductor's CPU template);
- matmul, softmax, matmul over query chunks of 1024 (oneDNN GEMMs, the scores materialised).

``python -m bench --only attention`` (about 2 minutes on 2 cores; ``--quick`` at 256², so 1024 tokens).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import row
from sdmaker.engine._device import SPEED_FLAGS, cpu_flags

__all__ = ["attention_paths", "run", "step_attention_share"]


def step_attention_share(size: int, rounds: int = 3) -> dict[str, Any]:
    """Median eager bf16 SD 2.1 step (CFG batch 2) and the seconds spent in its SDPA calls, by query length."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from bench.engine import sd21_dir
    from sdmaker.engine import load_model

    unet = load_model(sd21_dir("bf16"), dtype="bf16", digest="-").pipeline.unet
    gen = torch.Generator().manual_seed(0)
    lat = size // 8
    sample = torch.randn(2, 4, lat, lat, generator=gen).bfloat16()
    emb = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=gen).bfloat16()
    t = torch.tensor([500.0, 500.0])
    spent: dict[int, float] = {}
    original = F.scaled_dot_product_attention

    def timed(q: Any, k: Any, *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        out = original(q, k, *args, **kwargs)
        key = int(q.shape[-2]) if int(k.shape[-2]) == int(q.shape[-2]) else -1  # -1: cross-attention
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - began
        return out

    steps, shares = [], []
    F.scaled_dot_product_attention = timed  # type: ignore[assignment]  # restored below
    try:
        with torch.inference_mode():
            unet(sample, t, encoder_hidden_states=emb)  # warm-up
            for _ in range(rounds):
                spent.clear()
                began = time.perf_counter()
                unet(sample, t, encoder_hidden_states=emb)
                steps.append(time.perf_counter() - began)
                shares.append(dict(spent))
    finally:
        F.scaled_dot_product_attention = original
    mid = steps.index(statistics.median(steps)) if rounds % 2 else 0
    return {"step": statistics.median(steps), "attention": shares[mid], "tokens": lat * lat}


def attention_paths(tokens: int, heads: int = 5, head_dim: int = 64, repeat: int = 3,
                    compiled: bool = True) -> dict[str, float]:
    """Best-of-``repeat`` seconds of one (2, heads, tokens, head_dim) bf16 self-attention per path (the
    ``torch.compile`` paths only with ``compiled``: their first call compiles for tens of seconds)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, tokens, head_dim, generator=gen).bfloat16() for _ in range(3))
    scale = head_dim ** -0.5

    def chunked() -> Any:
        out = torch.empty_like(q)
        kt = k.transpose(-1, -2)
        for i in range(0, tokens, 1024):
            out[:, :, i:i + 1024] = torch.matmul((torch.matmul(q[:, :, i:i + 1024], kt) * scale).softmax(-1), v)
        return out

    paths: dict[str, Callable[[], Any]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                                           "chunked matmul-softmax-matmul": chunked}
    if compiled:
        compiled_sdpa = torch.compile(F.scaled_dot_product_attention)
        paths["compiled sdpa"] = lambda: compiled_sdpa(q, k, v)
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:  # a torch without it: the rows say what was measured
            pass
        else:
            compiled_flex = torch.compile(flex_attention)
            paths["compiled flex_attention"] = lambda: compiled_flex(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    best: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in paths.items():
            try:
                out = fn()  # warm-up (a compile happens here)
            except Exception:  # noqa: BLE001
                continue
            if float((out.float() - ref).abs().max()) > 0.05:
                raise AssertionError(f"attention path {name!r} disagrees with fp32 SDPA")
            times = []
            for _ in range(repeat):
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
            best[name] = min(times)
    return best


def run(quick: bool) -> list[dict[str, Any]]:
    import torch

    from bench.engine import gemm_peak
    from sdmaker.engine import cpu_has_native_bf16

    if torch.cuda.is_available() or not cpu_has_native_bf16():
        return [row("attention: SD2.1 first-level self-attention", None, None, "s",
                    "CPU bf16 benchmark; skipped without native bf16 or on a CUDA machine")]
    size = 256 if quick else 512
    share = step_attention_share(size)
    tokens = share["tokens"]
    paths = attention_paths(tokens)
    peak = gemm_peak("bf16", 2048, repeat=3) * 1e9
    flops = 4 * 2 * 5 * tokens * tokens * 64  # QK^T and PV, batch 2, 5 heads of 64
    flags = ", ".join(cpu_flags()) or "none of " + "/".join(SPEED_FLAGS)
    first = share["attention"].get(tokens, 0.0)
    rows = [row(f"attention: share of the SD2.1 bf16 UNet step {size}² CFG 2 spent in its {tokens}-token "
                "self-attention (eager)", first / share["step"], None, "fraction",
                f"{first:.2f} of {share['step']:.2f} s per step; all SDPA calls {sum(share['attention'].values()):.2f}"
                f" s; median of 3 steps; CPU flags: {flags}")]
    sdpa = paths.get("sdpa")
    for name, seconds in paths.items():
        if name == "sdpa" or sdpa is None:
            continue
        rows.append(row(f"attention: (2, 5, {tokens}, 64) bf16, torch SDPA (CPU flash kernel) vs {name}", sdpa,
                        seconds, "s", f"SDPA {flops / sdpa / 1e9:.0f} GFLOP/s = {flops / sdpa / peak:.2f} of the "
                        f"bf16 GEMM peak ({peak / 1e9:.0f} GFLOP/s, same run); {name} {flops / seconds / 1e9:.0f} "
                        f"GFLOP/s = {flops / seconds / peak:.2f}; best of 3; CPU flags: {flags}"))
    return rows
