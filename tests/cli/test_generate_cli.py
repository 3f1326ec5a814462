"""``sdmaker generate``: written paths, recipe round trip via --from, one-line errors with exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdmaker.cli import app
from sdmaker.engine import read_recipe

runner = CliRunner()
SMALL = ["--height", "64", "--width", "64", "--steps", "2"]


@pytest.fixture(autouse=True)
def _home(sdmaker_home: Path) -> Path:
    return sdmaker_home


def _paths(output: str) -> list[Path]:
    return [Path(line.strip()) for line in output.splitlines() if line.strip().endswith((".png", ".jpg", ".webp"))]


def test_generate_writes_pngs_with_recipes_and_from_regenerates(sd1_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["generate", "-m", str(sd1_dir), "-p", "a cat", "-p", "a dog", "--seed", "5",
                              "--scheduler", "euler", "-o", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    paths = _paths(res.stdout)
    assert [p.name for p in paths] == ["00-seed5.png", "01-seed6.png"]
    recipe = read_recipe(paths[1])
    assert recipe["request"]["prompt"] == "a dog" and recipe["request"]["seed"] == 6
    again = tmp_path / "again"
    res2 = runner.invoke(app, ["generate", "--from", str(paths[1]), "-m", str(sd1_dir), "-o", str(again)])
    assert res2.exit_code == 0, res2.output
    (regen,) = _paths(res2.stdout)
    a = np.asarray(Image.open(paths[1])).astype(int)
    b = np.asarray(Image.open(regen)).astype(int)
    # the image was made in a batch of two and is regenerated alone: fp32 rounding moves pixels by <= 1
    # level, bf16 (the default on CPUs with native bf16) by a few
    from sdmaker.engine import recommended_dtype

    assert np.abs(a - b).max() <= (1 if recommended_dtype("cpu") == "fp32" else 4)


def test_jpeg_output(sd1_dir: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["generate", "-m", str(sd1_dir), "-p", "x", "--format", "jpeg", "-o",
                              str(tmp_path), *SMALL])
    assert res.exit_code == 0, res.output
    (path,) = _paths(res.stdout)
    assert path.read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.parametrize(("args", "needle"), [
    (["--height", "65"], "height=65"),
    (["--steps", "0"], "num_inference_steps=0"),
    (["--scheduler", "nope"], "scheduler='nope'"),
    (["--guidance-scale", "100"], "guidance_scale=100.0"),
])
def test_bad_values_fail_in_one_line_before_loading(args: list[str], needle: str, tmp_path: Path) -> None:
    res = runner.invoke(app, ["generate", "-m", str(tmp_path / "missing"), "-p", "x", *args])
    assert res.exit_code == 1
    assert needle in res.output
    assert "Traceback" not in res.output
    assert "does not exist" not in res.output  # validated before the model is touched


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["generate", "-m", str(tmp_path / "nope"), "-p", "x"])
    assert res.exit_code == 1
    assert "Traceback" not in res.output


def test_missing_prompt_is_a_usage_error(sd1_dir: Path) -> None:
    res = runner.invoke(app, ["generate", "-m", str(sd1_dir)])
    assert res.exit_code == 2


def test_help() -> None:
    res = runner.invoke(app, ["generate", "--help"])
    assert res.exit_code == 0
    assert "--from" in res.output


def test_a_second_run_never_overwrites_the_first(sd1_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["generate", "-m", str(sd1_dir), "-p", "a cat", "--seed", "5", "-o", str(out), *SMALL]
    first = runner.invoke(app, [*args, "--format", "png"])
    assert first.exit_code == 0, first.output
    (a,) = _paths(first.stdout)
    before = a.read_bytes()
    second = runner.invoke(app, [*args, "--format", "png", "--guidance-scale", "1.5"])
    assert second.exit_code == 0, second.output
    (b,) = _paths(second.stdout)
    assert (a.name, b.name) == ("00-seed5.png", "00-seed5-2.png")
    assert a.read_bytes() == before and b.read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["00-seed5-2.png", "00-seed5.png"]  # no temp files left


def test_write_new_file_numbers_taken_names(tmp_path: Path) -> None:
    from sdmaker.cli._common import write_new_file

    paths = [write_new_file(tmp_path, "image-00", "jpg", bytes([i])) for i in range(3)]
    assert [p.name for p in paths] == ["image-00.jpg", "image-00-2.jpg", "image-00-3.jpg"]
    assert [p.read_bytes() for p in paths] == [b"\x00", b"\x01", b"\x02"]


_NO_TORCH = """
import sys
from sdmaker.cli import app
from sdmaker.cli._common import run_app
code = run_app(app, sys.argv[1:])
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


@pytest.mark.parametrize("command", [
    ["generate", "-p", "x", "--height", "13"],
    ["invoke", "some-endpoint", "-p", "x", "--height", "13"],
])
def test_an_invalid_request_is_rejected_before_torch_is_imported(command: list[str], sdmaker_home: Path) -> None:
    # its own process: this one has imported torch long ago
    res = subprocess.run([sys.executable, "-c", _NO_TORCH, *command], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SDMAKER_PORT": "1"})  # nothing answers there: never contacted
    assert res.stdout.split() == ["NO-TORCH", "1"], res.stdout + res.stderr
    assert "height=13" in res.stderr


@pytest.mark.parametrize("command", [["serve", "mini"], ["endpoint", "create", "e1"], ["generate", "-p", "x"]])
def test_a_bad_engine_is_one_line_naming_the_option(command: list[str]) -> None:
    res = runner.invoke(app, [*command, "--engine", "tensorrt"])
    assert res.exit_code == 1, res.output
    assert "engine must be one of auto, torch, openvino" in res.output
    assert "Traceback" not in res.output


def test_generate_never_builds_compiled_passes(sd2_dir: Path, sdmaker_home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One-shot runs load passes a serving worker built; with none in the cache they run eager, building none."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("SDMAKER_ENGINE", "openvino")  # named: even this tiny UNet would get passes
    res = runner.invoke(app, ["generate", "-m", str(sd2_dir), "-p", "x", *SMALL, "-o", str(sdmaker_home / "out")])
    assert res.exit_code == 0, res.output
    assert len(_paths(res.output)) == 1
    assert not list((sdmaker_home / "cache").rglob("*.ov"))


def test_serve_engine_option_reaches_the_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdmaker.config import export_engine, load_settings

    monkeypatch.setenv("SDMAKER_ENGINE", "auto")  # restored after the test
    export_engine("torch")
    assert load_settings().engine == "torch"  # what the worker's handler reads, in this process or after exec
    assert os.environ["SDMAKER_ENGINE"] == "torch"
