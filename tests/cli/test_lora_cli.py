"""``sdmaker model import FILE --base``, ``model list`` and ``generate --lora NAME[:SCALE]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sdmaker.cli import app
from sdmaker.engine import read_recipe

runner = CliRunner()
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--seed", "3"]


def _png(output: str) -> Path:
    return next(Path(line.strip()) for line in output.splitlines() if line.strip().endswith(".png"))


def test_import_list_and_generate_with_a_lora(sdmaker_home: Path, sd1_dir: Path, lora_files: dict[str, Path],
                                               tmp_path: Path) -> None:
    res = runner.invoke(app, ["model", "import", str(lora_files["kohya"]), "--name", "heart", "--base", str(sd1_dir)])
    assert res.exit_code == 0, res.output
    assert "kohya layout, rank 4" in res.output
    res = runner.invoke(app, ["model", "list"])
    assert "heart" in res.output and "lora r4" in res.output
    res = runner.invoke(app, ["model", "show", "heart"])
    assert "kohya" in res.output and "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in res.output
    res = runner.invoke(app, ["model", "import", str(lora_files["a"]), "--name", "stray", "--base", "mini"])
    assert res.exit_code != 0  # mini's UNet has other layers: refused, nothing stored
    plain = runner.invoke(app, ["generate", "-m", str(sd1_dir), "-p", "x", *SMALL, "-o", str(tmp_path / "p")])
    with_lora = runner.invoke(app, ["generate", "-m", str(sd1_dir), "-p", "x", *SMALL, "--lora", "heart:0.5",
                                    "-o", str(tmp_path / "l")])
    assert plain.exit_code == 0 and with_lora.exit_code == 0, with_lora.output
    recipe = read_recipe(_png(with_lora.output))
    assert recipe["request"]["loras"] == [{"name": "heart", "scale": 0.5}]
    assert recipe["adapters"][0]["name"] == "heart" and len(recipe["adapters"][0]["digest"]) == 64
    a, b = (np.asarray(Image.open(_png(r.output)), dtype=np.int16) for r in (plain, with_lora))
    assert np.abs(a - b).max() > 0
    again = runner.invoke(app, ["generate", "--from", str(_png(with_lora.output)), "-m", str(sd1_dir),
                                "-o", str(tmp_path / "again")])
    assert np.array_equal(np.asarray(Image.open(_png(again.output))), np.asarray(Image.open(_png(with_lora.output))))
    bad = runner.invoke(app, ["generate", "-m", str(sd1_dir), "-p", "x", *SMALL, "--lora", "heart:9"])
    assert bad.exit_code != 0 and "loras[0].scale" in bad.output
    missing = runner.invoke(app, ["generate", "-m", str(sd1_dir), "-p", "x", *SMALL, "--lora", "nope"])
    assert missing.exit_code != 0 and "nope" in missing.output


def test_pickled_adapters_need_allow_pickle(sdmaker_home: Path, lora_files: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "adapter.bin"
    torch.save(load_file(lora_files["a"]), pickled)
    refused = runner.invoke(app, ["model", "import", str(pickled), "--name", "p"])
    assert refused.exit_code != 0 and "--allow-pickle" in refused.output
    res = runner.invoke(app, ["model", "import", str(pickled), "--name", "p", "--allow-pickle"])
    assert res.exit_code == 0, res.output
    assert "peft layout, rank 4" in res.output
