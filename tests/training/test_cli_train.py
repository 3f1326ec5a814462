"""``sdmaker train`` / ``sdmaker train export`` / ``sdmaker eval`` end to end on the quick recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdmaker.cli import app
from sdmaker.cli._common import run_app

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "train"


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick VAE + UNet trained through the CLI, exported and assembled like the built-in model."""
    from sdmaker.models import assemble_from

    root = tmp_path_factory.mktemp("quick-cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("SDMAKER_HOME", str(root / "home"))
    try:
        assert run_app(app, ["train", "vae", "--config", str(CONFIGS / "mini-vae.json"), "--quick",
                             "--out", str(root / "vae")]) == 0
        assert run_app(app, ["train", "unet", "--config", str(CONFIGS / "mini-unet.json"), "--quick",
                             "--vae", str(root / "vae" / "model"), "--out", str(root / "unet")]) == 0
        assert run_app(app, ["train", "export", "--vae", str(root / "vae" / "model"), "--unet",
                             str(root / "unet" / "model"), "--dest", str(root / "export")]) == 0
    finally:
        mp.undo()
    assert (root / "home" / "mlruns").is_dir()
    return assemble_from(root / "export", root / "model")


def test_train_refuses_wrong_kind_and_rerun_without_resume(tmp_path: Path, sdmaker_home: Path) -> None:
    assert run_app(app, ["train", "unet", "--config", str(CONFIGS / "mini-vae.json"), "--quick",
                         "--out", str(tmp_path / "x")]) == 1
    args = ["train", "vae", "--config", str(CONFIGS / "mini-vae.json"), "--quick", "--out", str(tmp_path / "v"),
            "--no-track"]
    assert run_app(app, args) == 0
    assert run_app(app, args) == 1  # checkpoint exists: needs --resume
    assert run_app(app, [*args, "--resume"]) == 0  # nothing left to do: re-exports


def test_eval_reports_json_metrics_and_logs_to_mlflow(quick_model: Path, sdmaker_home: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run_app(app, ["eval", str(quick_model), "--n", "8", "--steps", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n"] == 8 and data["settings"]["num_inference_steps"] == 2
    for key in ("overall", "color", "shape", "size", "position", "background", "two_shape_both"):
        assert 0.0 <= data["metrics"][key] <= 1.0
    assert "heldout_pairs" in data["groups"]
    assert list((sdmaker_home / "mlruns").glob("*/*/metrics/overall"))


def test_edit_eval_takes_n_scheduler_and_deep_cache(quick_model: Path, sdmaker_home: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # an explicit --n 128 (the txt2img default) is honoured, and the sampler options reach the edit requests
    for n, extra, want in ((128, ["--scheduler", "euler", "--deep-cache", "0"], ("euler", 0)), (None, [], None)):
        capsys.readouterr()
        args = ["eval", str(quick_model), "--task", "inpaint", "--steps", "2", "--json", "--no-track", *extra]
        assert run_app(app, [*args, *(["--n", str(n)] if n else [])]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["n"] == (n or 32)
        if want:
            assert (data["settings"]["scheduler"], data["settings"]["deep_cache_interval"]) == want

def test_exported_model_loads_with_engine_and_generates(quick_model: Path) -> None:
    from sdmaker.engine import generate, load_model
    from sdmaker.schema import parse_request

    model = load_model(quick_model)
    assert model.defaults["height"] == 64 and model.native_size == 64
    # the UNet was trained to predict v (the mini config): the exported scheduler must say so
    assert model.prediction_type == "v_prediction"
    req = parse_request({"prompt": "a small red circle at the top, white background", "seed": 3,
                         "num_inference_steps": 2}).resolve(model.defaults)
    a = generate(model, req).images[0].image
    b = generate(model, req).images[0].image
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_unet_before_vae_names_the_missing_vae_and_the_command(tmp_path: Path, sdmaker_home: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the config's "vae": "runs/mini-vae/model" is relative to here: absent
    assert run_app(app, ["train", "unet", "--config", str(CONFIGS / "mini-unet.json"), "--quick", "--no-track",
                         "--out", str(tmp_path / "u")]) == 1
    err = capsys.readouterr().err
    # the config's relative path is resolved when it is read: the message names the absolute folder
    assert f"the trained VAE {tmp_path / 'runs/mini-vae/model'} does not exist" in err
    assert f"`sdmaker train vae --config configs/train/mini-vae.json --out {tmp_path / 'runs/mini-vae'}`" in err
    assert "huggingface" not in err


def test_export_needs_dest_and_force_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdmaker.models import builtin_dir

    parts = ["train", "export", "--vae", str(tmp_path), "--unet", str(tmp_path)]  # never read: refused first
    assert run_app(app, parts) == 2  # no default --dest: it used to be the built-in model itself
    builtin = builtin_dir("mini")
    before = {p: p.stat().st_mtime_ns for p in builtin.rglob("*")}
    capsys.readouterr()
    assert run_app(app, [*parts, "--dest", str(builtin)]) == 1
    assert "refusing to overwrite the built-in model 'mini'" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in builtin.rglob("*")} == before
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model_index.json").write_text("{}")
    assert run_app(app, [*parts, "--dest", str(taken)]) == 1
    assert "--force" in capsys.readouterr().err and (taken / "model_index.json").read_text() == "{}"
