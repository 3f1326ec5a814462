"""The built-in model ``mini``: assembled into a standard diffusers folder the engine loads unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdmaker.errors import ModelNotFoundError
from sdmaker.models import BUILTIN_NAMES, TOKENIZER_MAX_LENGTH, assemble_builtin, assemble_from, is_builtin_ready


def test_unknown_builtin_and_incomplete_export_raise_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        assemble_builtin("nope", tmp_path / "x")
    (tmp_path / "partial").mkdir()
    with pytest.raises(ModelNotFoundError, match="missing"):
        assemble_from(tmp_path / "partial", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_assembling_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from sdmaker.models import assemble_builtin, is_builtin_ready; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not is_builtin_ready("mini"), reason="mini weights not committed in this checkout")
def test_mini_assembles_loads_and_generates(tmp_path: Path) -> None:
    from sdmaker.engine import generate, load_model
    from sdmaker.schema import parse_request

    assert "mini" in BUILTIN_NAMES
    folder = assemble_builtin("mini", tmp_path / "mini")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json", "README.md"):
        assert (folder / part).exists(), part
    tok_cfg = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == TOKENIZER_MAX_LENGTH
    weights = sum(p.stat().st_size for p in (Path(__file__).parents[2] / "sdmaker" / "models" / "mini").rglob("*")
                  if p.suffix == ".safetensors")
    assert weights <= 40 * 2**20
    model = load_model(folder)
    assert model.defaults["height"] == 64 and model.native_size == 64
    assert type(model.pipeline.text_encoder).__name__ == "BertModel"
    request = parse_request({"prompt": "a large red circle in the center on a white background", "seed": 1,
                             "num_inference_steps": 4})
    result = generate(model, request.resolve(model.defaults))
    assert result.images[0].image.size == (64, 64)
    # the committed weights meet issue 4's targets on a slice of the held-out eval (32 prompts, 12 of them
    # two-shape; all right in bf16 and fp32 when committed): a broken export, fp16 conversion or a
    # scheduler that lost the v-prediction setting fails this long before the full eval is rerun
    from sdmaker.training._eval import evaluate

    report = evaluate(model, n=32)
    m = report.metrics
    assert m["color"] >= 0.95 and m["shape"] >= 0.9 and m["position"] >= 0.9, m
    assert m["two_shape_both"] >= 0.75, report.groups  # 9 of 12: margin for another CPU's rounding
    # assembling again replaces the folder atomically
    assert assemble_builtin("mini", tmp_path / "mini") == folder
