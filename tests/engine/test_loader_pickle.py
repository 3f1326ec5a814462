"""The loader applies the same pickle rule as the store (sdmaker.files): suffixes compared in any case."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdmaker.errors import PickleRefusedError


def test_upper_case_pickle_weights_are_refused(tmp_path: Path) -> None:
    from sdmaker import engine, files
    from sdmaker.engine._loader import _check_folder

    assert engine.find_pickle_weights is files.find_pickle_weights  # one rule, not a copy
    (tmp_path / "model_index.json").write_text("{}")
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / component).mkdir()
    (tmp_path / "unet" / "DIFFUSION_PYTORCH_MODEL.BIN").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PickleRefusedError, match="allow-pickle"):
        _check_folder(tmp_path, allow_pickle=False)
    _check_folder(tmp_path, allow_pickle=True)
