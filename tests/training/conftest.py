"""Fixtures of the training tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sdmaker.training._trainer import CHECKPOINT_FILE

StateFn = Callable[..., dict[str, torch.Tensor]]


def _checkpoint_tensors(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a run's checkpoint (weights, EMA, optimizer moments) by a flat name, to compare runs
    bit for bit; ``step`` also checks the step the checkpoint was written at."""
    ckpt = torch.load(run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    if step is not None:
        assert ckpt["step"] == step
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    out.update({f"ema.{i}": t for i, t in enumerate(ckpt["ema"])})
    for idx, st in ckpt["optimizer"]["state"].items():
        out.update({f"opt.{idx}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


@pytest.fixture
def checkpoint_tensors() -> StateFn:
    return _checkpoint_tensors
