"""``sdmaker s3 cp`` against the moto server."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sdmaker.cli import app

runner = CliRunner()


def test_cp_up_down_and_between(s3_bucket: str, sdmaker_home: Path, tmp_path: Path, fake_model_dir: Path) -> None:
    src = tmp_path / "model.tar"
    src.write_bytes(b"artifact bytes" * 1000)
    result = runner.invoke(app, ["s3", "cp", str(src), f"s3://{s3_bucket}/a/"])
    assert result.exit_code == 0, result.output
    assert f"s3://{s3_bucket}/a/model.tar" in result.output
    result = runner.invoke(app, ["s3", "cp", f"s3://{s3_bucket}/a/model.tar", f"s3://{s3_bucket}/b/"])
    assert result.exit_code == 0 and f"s3://{s3_bucket}/b/model.tar" in result.output
    result = runner.invoke(app, ["s3", "cp", f"s3://{s3_bucket}/b/model.tar", str(tmp_path / "back.tar")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back.tar").read_bytes() == src.read_bytes()
    result = runner.invoke(app, ["s3", "cp", str(fake_model_dir), f"s3://{s3_bucket}/folder"])
    assert result.exit_code == 0 and "uploaded 6 files" in result.output
    result = runner.invoke(app, ["s3", "cp", f"s3://{s3_bucket}/folder/", str(tmp_path / "folder")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "folder" / "unet" / "config.json").read_bytes() == (
        fake_model_dir / "unet" / "config.json").read_bytes()


def test_cp_errors(s3_bucket: str, sdmaker_home: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["s3", "cp", f"s3://{s3_bucket}/missing.tar.gz", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no such object" in result.output
    result = runner.invoke(app, ["s3", "cp", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 1 and "s3://" in result.output
    result = runner.invoke(app, ["s3", "cp", str(tmp_path / "nope"), f"s3://{s3_bucket}/x"])
    assert result.exit_code == 1 and "does not exist" in result.output
