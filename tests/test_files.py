"""sdmaker.files: atomic writes, folder swaps, the one walker/digest and its symlink rule, the pickle rule."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
import stat
from pathlib import Path

import pytest

from sdmaker.files import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    find_pickle_weights,
    is_pickle_weight,
    list_model_files,
    replace_dir,
    staged_dir,
    tree_digest,
    write_once,
)
from sdmaker.store import Store


def _hf_snapshot(cache: Path, repo: str, revision: str, model: Path) -> Path:
    """Lay ``model`` out as the hub cache does: blobs/<sha> plus snapshots/<rev>/<path> -> ../../blobs/<sha>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / revision
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        rel = path.relative_to(model)
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snap


def test_hf_cache_snapshots_digest_their_content(tmp_path: Path, make_fake_model) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "hub"
    snaps = [_hf_snapshot(cache, "org/tiny", f"{i:040x}", make_fake_model(tmp_path / f"src{i}", seed=i))
             for i in range(2)]
    assert all((s / "unet" / "config.json").is_symlink() for s in snaps)  # every file is a link into blobs/
    digests = [tree_digest(s) for s in snaps]
    assert digests[0] != digests[1]
    assert hashlib.sha256(b"").hexdigest() not in digests  # the old bug: links skipped, nothing hashed
    store = Store(tmp_path / "store")
    for i, snap in enumerate(snaps):
        copy = tmp_path / f"resolved{i}"
        shutil.copytree(snap, copy)  # follows the links: a plain folder with the same files
        assert not any(p.is_symlink() for p in copy.rglob("*"))
        assert tree_digest(copy) == digests[i] == tree_digest(tmp_path / f"src{i}")
        assert store.import_folder(snap, name=f"m{i}").digest == digests[i]  # the store agrees
        assert tree_digest(store.model_path(f"m{i}")) == digests[i]


def test_hf_snapshot_links_outside_the_repo_are_refused(tmp_path: Path, make_fake_model) -> None:  # type: ignore[no-untyped-def]
    from sdmaker.errors import ModelFormatError

    snap = _hf_snapshot(tmp_path / "hub", "org/tiny", "a" * 40, make_fake_model(tmp_path / "src"))
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", snap / "unet" / "extra.json")
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        list_model_files(snap)


def test_pickle_rule_is_case_insensitive(tmp_path: Path, make_fake_model) -> None:  # type: ignore[no-untyped-def]
    assert is_pickle_weight("unet/MODEL.BIN") and is_pickle_weight("x.Ckpt") and not is_pickle_weight("a.safetensors")
    src = make_fake_model(tmp_path / "m", extra={"unet/DIFFUSION_PYTORCH_MODEL.BIN": b"\x80\x04pickle",
                                                  "vae/w.Pt": b"\x80\x04pickle"})
    assert find_pickle_weights(src) == [Path("unet/DIFFUSION_PYTORCH_MODEL.BIN"), Path("vae/w.Pt")]


def test_atomic_writes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{"a": 1}'
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as fh:
        fh.write(b"half")
        raise RuntimeError("writer died")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"\x00\x01"  # a failed write leaves the old content
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]  # and no temp files
    with pytest.raises(ValueError, match="mode"), atomic_open(target, "ab"):
        pass


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with staged_dir(dest) as work:
        (work / "a.txt").write_text("1")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError), staged_dir(dest) as work:
        (work / "b.txt").write_text("2")
        raise RuntimeError("build failed")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # the old folder is untouched
    new = tmp_path / "new"
    new.mkdir()
    (new / "c.txt").write_text("3")
    replace_dir(new, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["c.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it


def _numbered(folder: Path) -> itertools.chain[Path]:
    return itertools.chain([folder / "a.bin"], (folder / f"a-{n}.bin" for n in itertools.count(2)))


def test_write_once_never_replaces_and_takes_the_next_free_name(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "out"  # created on demand
    assert write_once(folder / "key", b"first") == folder / "key"
    assert write_once(folder / "key", b"second") is None  # the first writer wins
    assert (folder / "key").read_bytes() == b"first"
    paths = [write_once(_numbered(folder), bytes([i])) for i in range(3)]
    assert [p.name for p in paths if p] == ["a.bin", "a-2.bin", "a-3.bin"]
    assert [p.read_bytes() for p in paths if p] == [b"\x00", b"\x01", b"\x02"]
    assert sorted(p.name for p in folder.iterdir()) == ["a-2.bin", "a-3.bin", "a.bin", "key"]  # no temp files


def test_write_once_mode_applies_from_the_first_byte(tmp_path: Path) -> None:
    path = write_once(tmp_path / "secret", b"s", mode=0o600)
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_once_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a.bin").write_bytes(b"old")
    path = write_once(_numbered(tmp_path), b"new", mode=0o600)
    assert path == tmp_path / "a-2.bin" and path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-2.bin", "a.bin"]


def test_write_once_other_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "link", broken)
    with pytest.raises(OSError, match="I/O error"):
        write_once(tmp_path / "x", b"x")
    assert list(tmp_path.iterdir()) == []
