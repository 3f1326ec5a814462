"""package_model: SageMaker layout, every compression readable by plain tar, round trip through the store."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from sdmaker.errors import InvalidRequestError, ModelNotFoundError
from sdmaker.files import tree_digest
from sdmaker.store import Store, format_for, package_model, safe_extract
from sdmaker.store import _package as package_module
from sdmaker.store._gzip import ParallelGzipWriter, crc32_combine

TAR_FLAGS = {"model.tar.gz": ["-xzf"], "model.tar": ["-xf"], "model.tar.zst": ["--zstd", "-xf"]}


@pytest.fixture(scope="module")
def stored_sd1(tmp_path_factory: pytest.TempPathFactory, sd1_dir: Path) -> tuple[Store, str]:
    store = Store(tmp_path_factory.mktemp("pkg-store"))
    store.import_model(sd1_dir, name="sd1")
    return store, "sd1"


@pytest.mark.parametrize("out_name", sorted(TAR_FLAGS))
def test_package_plain_tar_import_round_trip(out_name: str, tmp_path: Path, stored_sd1: tuple[Store, str]) -> None:
    if out_name.endswith(".zst") and shutil.which("zstd") is None:
        pytest.skip("GNU tar needs the zstd program for .tar.zst (apt-get install zstd); safe_extract tests cover it")
    store, name = stored_sd1
    src_manifest = store.get(name)
    result = package_model(store.model_path(name), tmp_path / out_name, seed_handler=True)
    assert result.compression == format_for(out_name)
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["tar", *TAR_FLAGS[out_name], str(tmp_path / out_name), "-C", str(extracted)], check=True)
    # SageMaker layout: model files at the root, handler under code/
    assert (extracted / "model_index.json").is_file()
    assert (extracted / "code" / "inference.py").read_text().count("def model_fn") == 1
    assert "diffusers==" in (extracted / "code" / "requirements.txt").read_text()
    for f in src_manifest.files:
        assert (extracted / f.path).stat().st_size == f.size
    imported = Store(tmp_path / "store2").import_model(extracted, name="back")
    assert imported.digest == tree_digest(extracted)
    model_files = {(f.path, f.sha256) for f in imported.files if not f.path.startswith("code/")}
    assert model_files == {(f.path, f.sha256) for f in src_manifest.files}
    # packaging the re-imported model (code/ already there) gives the same content again
    again = tmp_path / ("again-" + out_name)
    package_model(Store(tmp_path / "store2").model_path("back"), again)
    assert tree_digest(extracted) == tree_digest(_extract(again, tmp_path / "again"))


def _extract(archive: Path, dest: Path) -> Path:
    safe_extract(archive, dest)
    return dest


def test_python_tarfile_reads_gzip_artifact_in_both_modes(tmp_path: Path, stored_sd1: tuple[Store, str]) -> None:
    store, name = stored_sd1
    out = tmp_path / "model.tar.gz"
    result = package_model(store.model_path(name), out)
    expected = {f.path for f in store.get(name).files}  # no code/ unless given or --seed-handler
    for mode in ("r:gz", "r|gz"):  # "r|gz" would stop after a first gzip member: the artifact is one member
        with tarfile.open(out, mode) as tf:
            assert {m.name for m in tf if m.isreg()} == expected
    subprocess.run(["gzip", "-t", str(out)], check=True)
    weights = [k for k in result.levels if k.endswith(".safetensors") and (store.model_path(name) / k).stat().st_size
               >= 1024 * 1024]
    assert weights and all(result.levels[k] == 0 for k in weights), result.levels  # random weights: stored
    assert result.levels["model_index.json"] == 6


def test_code_dir_overrides_and_exclusions(tmp_path: Path, make_fake_model) -> None:  # type: ignore[no-untyped-def]
    src = make_fake_model(tmp_path / "src", extra={".git/HEAD": b"ref", "code/helper.py": b"X = 1\n"})
    os.symlink(src / "model_index.json", src / "link.json")
    code = tmp_path / "code"
    (code / "lib").mkdir(parents=True)
    (code / "inference.py").write_text("def model_fn(d):\n    return d\n")
    (code / "lib" / "util.py").write_text("Y = 2\n")
    out = tmp_path / "m.tar"
    package_model(src, out, code_dir=code)
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf}
        assert tf.extractfile("code/inference.py").read() == (code / "inference.py").read_bytes()  # type: ignore[union-attr]
    assert {"code/helper.py", "code/lib/util.py", "model_index.json"} <= set(members)
    assert "code/requirements.txt" not in members  # nothing is invented without --seed-handler
    assert not any(n.startswith(".git") for n in members)
    assert all(m.isreg() or m.isdir() for m in members.values())  # no symlinks (SageMaker refuses them)
    assert members["link.json"].isreg()  # a file symlink is archived as the file it points to


def test_output_names_and_mismatches(tmp_path: Path, fake_model_dir: Path) -> None:
    with pytest.raises(InvalidRequestError, match="must end with"):
        package_model(fake_model_dir, tmp_path / "model.zip")
    with pytest.raises(InvalidRequestError, match="does not match"):
        package_model(fake_model_dir, tmp_path / "model.tar.gz", compression="none")
    with pytest.raises(ModelNotFoundError):
        package_model(tmp_path / "missing", tmp_path / "model.tar.gz")
    assert format_for("s3://b/k/model.tgz") == "gzip" and format_for("x.TAR.ZST", "zstd") == "zstd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-model"]


def test_failed_packaging_leaves_no_output(tmp_path: Path, fake_model_dir: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    out = tmp_path / "out" / "model.tar.gz"
    out.parent.mkdir()
    out.write_bytes(b"previous artifact")

    def boom(entry):  # type: ignore[no-untyped-def]
        if entry.arcname.startswith("vae/"):
            raise OSError("read error")
        return 6

    monkeypatch.setattr(package_module, "_gzip_level", boom)
    with pytest.raises(OSError, match="read error"):
        package_model(fake_model_dir, out)
    assert [p.name for p in out.parent.iterdir()] == ["model.tar.gz"]
    assert out.read_bytes() == b"previous artifact"


def test_forced_gzip_level_compresses(tmp_path: Path, make_fake_model) -> None:  # type: ignore[no-untyped-def]
    src = make_fake_model(tmp_path / "z", extra={"unet/zeros.safetensors": bytes(3 * 1024 * 1024)})
    auto = package_model(src, tmp_path / "auto.tar.gz")
    assert auto.levels["unet/zeros.safetensors"] == 1  # compressible weights are deflated, not stored
    forced = package_model(src, tmp_path / "l9.tar.gz", gzip_level=9)
    assert set(forced.levels.values()) == {9}
    assert forced.bytes_out < 0.5 * forced.bytes_in


def test_crc32_combine_matches_zlib() -> None:
    a, b = os.urandom(1000), os.urandom(70_001)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b""), 0) == zlib.crc32(a)


def test_parallel_gzip_writer_mixed_levels_is_one_member() -> None:
    import gzip

    buf = io.BytesIO()
    writer = ParallelGzipWriter(buf, workers=2, chunk_bytes=64 * 1024)
    pieces = [(6, b'{"a": 1}' * 500), (0, os.urandom(300_000)), (1, bytes(200_000)), (0, b"tail")]
    for level, data in pieces:
        writer.write(data, level)
    writer.close()
    raw = buf.getvalue()
    assert gzip.decompress(raw) == b"".join(d for _, d in pieces)
    d = zlib.decompressobj(31)
    assert d.decompress(raw) == b"".join(x for _, x in pieces) and d.eof and d.unused_data == b""
