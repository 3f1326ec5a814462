"""``sdmaker model import`` fits a model's preview factors against its VAE and the store keeps them with it."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sdmaker.cli import app
from sdmaker.config import load_settings
from sdmaker.files import preview_factors_path
from sdmaker.store import Store

runner = CliRunner()


def test_import_fits_preview_factors_kept_beside_the_snapshot(sdmaker_home: Path, sd1_dir: Path) -> None:
    result = runner.invoke(app, ["model", "import", str(sd1_dir), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    store = Store(load_settings().store_dir)
    snapshot = store.model_path("tiny")
    factors = preview_factors_path(snapshot)
    assert factors.is_file() and factors.parent == snapshot.parent

    from sdmaker.engine import load_model

    assert load_model(snapshot, dtype="fp32").latent_preview is not None  # workers read them, not refit
    store.gc()
    assert factors.is_file()  # gc keeps a live snapshot's factors
    assert runner.invoke(app, ["model", "rm", "tiny"]).exit_code == 0
    assert not factors.exists()  # and drops them with it
    skipped = runner.invoke(app, ["model", "import", str(sd1_dir), "--name", "again", "--no-fit-previews"])
    assert skipped.exit_code == 0 and not preview_factors_path(store.model_path("again")).exists()
