"""``sdmaker model ...`` through typer's CliRunner: exit codes and what users read."""

from __future__ import annotations

import subprocess
from pathlib import Path

from typer.testing import CliRunner

from sdmaker.cli import app
from sdmaker.files import tree_digest

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_import_list_show_package_rm(sdmaker_home: Path, tmp_path: Path, sd1_dir: Path) -> None:
    out = _ok(["model", "import", str(sd1_dir), "--name", "tiny"])
    digest = tree_digest(sd1_dir)
    assert "imported tiny" in out and digest in out
    assert "tiny" in _ok(["model", "list"])
    show = _ok(["model", "show", "tiny"])
    for expected in (digest, "epsilon", "CLIPTextModel", "unet/diffusion_pytorch_model.safetensors"):
        assert expected in show
    artifact = tmp_path / "model.tar.gz"
    out = _ok(["model", "package", "tiny", "-o", str(artifact), "--seed-handler"])
    assert str(artifact) in out and "gzip" in out
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["tar", "-xzf", str(artifact), "-C", str(extracted)], check=True)
    assert (extracted / "code" / "inference.py").is_file()
    _ok(["model", "import", str(artifact), "--name", "back"])
    assert "back" in _ok(["model", "list"])
    assert "removed tiny" in _ok(["model", "rm", "tiny"])
    listing = _ok(["model", "list"])
    assert "tiny" not in listing and "back" in listing


def test_package_with_code_dir_and_zstd(sdmaker_home: Path, tmp_path: Path, fake_model_dir: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "inference.py").write_text("def model_fn(d):\n    return d\n")
    out = tmp_path / "m.tar.zst"
    _ok(["model", "package", str(fake_model_dir), "--code", str(code), "-o", str(out), "--compression", "zstd"])
    result = runner.invoke(app, ["model", "import", str(out), "--name", "z"])
    assert result.exit_code == 0, result.output


def test_errors_are_one_clear_line_exit_1(sdmaker_home: Path, tmp_path: Path, make_fake_model) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["model", "show", "nope"])
    assert result.exit_code == 1 and "no model named 'nope'" in result.output
    assert "Traceback" not in result.output
    pickled = make_fake_model(tmp_path / "p", extra={"unet/diffusion_pytorch_model.bin": b"pickle"})
    result = runner.invoke(app, ["model", "import", str(pickled), "--name", "p"])
    assert result.exit_code == 1 and "--allow-pickle" in result.output
    _ok(["model", "import", str(pickled), "--name", "p", "--allow-pickle"])
    result = runner.invoke(app, ["model", "import", str(pickled), "--name", "p", "--allow-pickle"])
    assert result.exit_code == 1 and "--overwrite" in result.output
    _ok(["model", "import", str(pickled), "--name", "p", "--allow-pickle", "--overwrite"])
    result = runner.invoke(app, ["model", "import", "org/model", "--name", "hub"])
    assert result.exit_code == 1 and "offline" in result.output
    result = runner.invoke(app, ["model", "package", "p", "-o", str(tmp_path / "m.zip")])
    assert result.exit_code == 1 and ".tar.gz" in result.output
    result = runner.invoke(app, ["model", "import", str(pickled), "--name", "../x"])
    assert result.exit_code == 1 and "not valid" in result.output
    assert runner.invoke(app, ["model", "import", str(pickled)]).exit_code == 2  # usage: --name missing


def test_hostile_archive_import_refused(sdmaker_home: Path, tmp_path: Path) -> None:
    import io
    import tarfile

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    result = runner.invoke(app, ["model", "import", str(archive), "--name", "evil"])
    assert result.exit_code == 1 and "'../escape.txt'" in result.output
    assert not (tmp_path / "escape.txt").exists()
    assert "no models" in _ok(["model", "list"])


def test_help_everywhere() -> None:
    for args in (["model", "--help"], ["model", "import", "--help"], ["model", "package", "--help"],
                 ["s3", "cp", "--help"]):
        assert "Usage" in _ok(args)
