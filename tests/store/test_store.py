"""The content-addressed store: import, dedup, digests, crash safety, pickle refusal, removal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdmaker.config import Settings
from sdmaker.errors import (
    InvalidRequestError,
    ModelExistsError,
    ModelFormatError,
    ModelNotFoundError,
    OfflineError,
    PickleRefusedError,
    StoreIntegrityError,
)
from sdmaker.files import tree_digest
from sdmaker.store import Store
from sdmaker.store import _store as store_module


def _visible(store: Store) -> dict[str, list[str]]:
    """Everything a reader could see, plus the staging areas that must be empty after a failure."""
    out = {}
    for sub in ("manifests", "blobs", "snapshots", "tmp", "staging"):
        d = store.root / sub
        out[sub] = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    return out


def test_import_real_model_folder(tmp_path: Path, sd1_dir: Path) -> None:
    store = Store(tmp_path / "store")
    m = store.import_model(sd1_dir, name="sd1")
    path = store.model_path("sd1")
    assert m.digest == tree_digest(path) == tree_digest(sd1_dir)
    assert {f.path for f in m.files} == {p.relative_to(sd1_dir).as_posix() for p in sd1_dir.rglob("*") if p.is_file()}
    assert m.total_size == sum(f.size for f in m.files)
    assert m.architecture.text_encoder_class == "CLIPTextModel"
    assert m.architecture.unet_block_out_channels == json.loads((sd1_dir / "unet/config.json").read_text())[
        "block_out_channels"]
    assert m.prediction_type == "epsilon"
    for f in m.files:  # the snapshot is a normal folder of hard links into the blobs
        assert (path / f.path).stat().st_ino == (store.root / "blobs" / f.sha256).stat().st_ino
    assert store.get("sd1") == m
    assert [x.name for x in store.list()] == ["sd1"]


def test_import_v_prediction_model_reads_architecture(tmp_path: Path, sd2_dir: Path) -> None:
    m = Store(tmp_path / "store").import_model(sd2_dir, name="sd2")
    assert m.prediction_type == "v_prediction"
    assert m.architecture.cross_attention_dim == json.loads((sd2_dir / "unet/config.json").read_text())[
        "cross_attention_dim"]


def test_stored_model_loads_with_diffusers(tmp_path: Path, sd1_dir: Path) -> None:
    from sdmaker.engine import load_model

    store = Store(tmp_path / "store")
    m = store.import_model(sd1_dir, name="sd1")
    loaded = load_model(store.model_path("sd1"), name="sd1", digest=m.digest)
    assert loaded.prediction_type == "epsilon"


def test_dedup_shared_files_stored_once(tmp_path: Path, make_fake_model) -> None:
    a = make_fake_model(tmp_path / "a")
    b = make_fake_model(tmp_path / "b", extra={"sdmaker.json": json.dumps({"defaults": {"height": 64}}).encode()})
    store = Store(tmp_path / "store")
    ma = store.import_model(a, name="a")
    mb = store.import_model(b, name="b")
    assert mb.defaults == {"height": 64}
    unique = {f.sha256 for f in ma.files} | {f.sha256 for f in mb.files}
    assert sorted(_visible(store)["blobs"]) == sorted(unique)
    assert len(unique) == len(ma.files) + 1  # only sdmaker.json is new
    store.remove("a")
    assert sorted(_visible(store)["blobs"]) == sorted(f.sha256 for f in mb.files)
    assert tree_digest(store.model_path("b")) == mb.digest
    store.remove("b")
    assert _visible(store) == {"manifests": [], "blobs": [], "snapshots": [], "tmp": [], "staging": []}


def test_same_content_two_names_share_snapshot(tmp_path: Path, fake_model_dir: Path) -> None:
    store = Store(tmp_path / "store")
    store.import_model(fake_model_dir, name="x")
    store.import_model(fake_model_dir, name="y")
    assert store.model_path("x") == store.model_path("y")
    store.remove("x")
    assert store.model_path("y").is_dir()


def test_crash_mid_import_leaves_nothing(tmp_path: Path, fake_model_dir: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    store = Store(tmp_path / "store")
    real = store_module.copy_hashing
    calls = {"n": 0}

    def flaky(src: Path, dest: Path, on_bytes=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk on fire")
        return real(src, dest, on_bytes)

    monkeypatch.setattr(store_module, "copy_hashing", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        store.import_model(fake_model_dir, name="m")
    assert _visible(store) == {"manifests": [], "blobs": [], "snapshots": [], "tmp": [], "staging": []}
    assert store.list() == []
    monkeypatch.setattr(store_module, "copy_hashing", real)
    assert store.import_model(fake_model_dir, name="m").digest == tree_digest(fake_model_dir)


def test_crash_at_commit_point_keeps_previous_blobs(tmp_path: Path, make_fake_model, fake_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    store.import_model(fake_model_dir, name="first")
    before = _visible(store)
    other = make_fake_model(tmp_path / "other", seed=7)

    def boom(path: Path, text: str) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C exactly at the manifest write

    monkeypatch.setattr(store_module, "atomic_write_text", boom)
    with pytest.raises(KeyboardInterrupt):
        store.import_model(other, name="second")
    monkeypatch.undo()
    assert _visible(store) == before  # no manifest, blob or snapshot of "second" survives


def test_leftover_tmp_from_killed_process_is_cleaned(tmp_path: Path, fake_model_dir: Path) -> None:
    store = Store(tmp_path / "store")
    (store.root / "tmp").mkdir(parents=True)
    (store.root / "tmp" / ".tmp-blob-123-dead").write_bytes(b"partial")
    store.import_model(fake_model_dir, name="m")
    assert _visible(store)["tmp"] == []


def test_names_and_existing(tmp_path: Path, make_fake_model, fake_model_dir: Path) -> None:
    store = Store(tmp_path / "store")
    for bad in ("../evil", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(InvalidRequestError):
            store.import_model(fake_model_dir, name=bad)
    store.import_model(fake_model_dir, name="m")
    with pytest.raises(ModelExistsError, match="--overwrite"):
        store.import_model(fake_model_dir, name="m")
    other = make_fake_model(tmp_path / "other", seed=3)
    m2 = store.import_model(other, name="m", overwrite=True)
    assert store.get("m").digest == m2.digest == tree_digest(other)
    assert sorted(_visible(store)["blobs"]) == sorted({f.sha256 for f in m2.files})  # old blobs collected
    with pytest.raises(ModelNotFoundError, match="stored: m"):
        store.get("nope")
    with pytest.raises(ModelNotFoundError):
        store.remove("nope")


def test_not_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hi")
    with pytest.raises(ModelFormatError, match="model_index.json"):
        Store(tmp_path / "store").import_model(tmp_path / "junk", name="j")
    with pytest.raises(ModelNotFoundError):
        Store(tmp_path / "store").import_model(tmp_path / "missing", name="j")


def test_pickle_refused_unless_allowed(tmp_path: Path, make_fake_model) -> None:
    src = make_fake_model(tmp_path / "p", extra={"unet/diffusion_pytorch_model.bin": b"\x80\x04pickle"})
    store = Store(tmp_path / "store")
    with pytest.raises(PickleRefusedError, match="--allow-pickle") as info:
        store.import_model(src, name="p")
    assert info.value.fields["files"] == ["unet/diffusion_pytorch_model.bin"]
    assert store.list() == []
    m = store.import_model(src, name="p", allow_pickle=True)
    assert "unet/diffusion_pytorch_model.bin" in {f.path for f in m.files}


def test_excluded_names_and_symlinks(tmp_path: Path, make_fake_model) -> None:
    src = make_fake_model(tmp_path / "s", extra={".git/config": b"[core]", "unet/.DS_Store": b"x"})
    os.symlink("../model_index.json", src / "unet" / "linked.json")  # a link inside the folder is followed
    os.symlink("unet", src / "also-unet")  # so is a folder link inside it
    m = Store(tmp_path / "store").import_model(src, name="s")
    paths = {f.path for f in m.files}
    assert ".git/config" not in paths and "unet/.DS_Store" not in paths
    assert "unet/linked.json" in paths and "also-unet/config.json" in paths
    assert m.digest == tree_digest(src)


@pytest.mark.parametrize("make_link", [
    lambda src, out: os.symlink(out / "secret.txt", src / "unet" / "stolen.txt"),  # a file outside the folder
    lambda src, out: os.symlink(out, src / "outside-dir"),  # a folder outside it
    lambda src, out: os.symlink("..", src / "unet" / "loop"),  # a loop back to an ancestor
    lambda src, out: os.symlink("missing.json", src / "dangling.json"),  # a dangling link
], ids=["file-outside", "dir-outside", "loop", "dangling"])
def test_symlinks_that_leave_the_folder_are_refused(tmp_path: Path, make_fake_model, make_link) -> None:
    src = make_fake_model(tmp_path / "s")
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "secret.txt").write_text("do not import me")
    make_link(src, out)
    store = Store(tmp_path / "store")
    with pytest.raises(ModelFormatError, match="symlink") as info:
        store.import_model(src, name="s")
    assert info.value.fields["reason"] == "symlink"
    assert store.list() == [] and not (store.blobs.exists() and any(store.blobs.iterdir()))
    with pytest.raises(ModelFormatError, match="symlink"):  # the digest and the store follow one rule
        tree_digest(src)


def test_snapshot_rebuilt_and_verify(tmp_path: Path, fake_model_dir: Path) -> None:
    store = Store(tmp_path / "store")
    m = store.import_model(fake_model_dir, name="m")
    shutil.rmtree(store.model_path("m"))
    assert tree_digest(store.model_path("m")) == m.digest
    assert store.verify("m") == m
    blob = store.root / "blobs" / m.files[-1].sha256
    os.chmod(blob, 0o644)
    blob.write_bytes(b"tampered")
    with pytest.raises(StoreIntegrityError, match="modified"):
        store.verify("m")


def test_progress_reaches_total(tmp_path: Path, fake_model_dir: Path) -> None:
    seen: list[tuple[int, int]] = []
    m = Store(tmp_path / "store").import_model(fake_model_dir, name="m", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (m.total_size, m.total_size)


def test_hub_id_offline_fails_at_once(tmp_path: Path, fake_model_dir: Path) -> None:
    settings = Settings(home=tmp_path / "home", offline=True)
    store = Store(settings.store_dir, settings=settings)
    with pytest.raises(OfflineError, match="offline") as info:
        store.import_model("someorg/some-model", name="hub")
    assert "sdmaker model import" in info.value.message
    assert store.list() == []


def test_hub_id_from_local_hf_cache(tmp_path: Path, make_fake_model) -> None:
    """An HF cache snapshot (files are symlinks to blobs) imports and resolves offline."""
    from sdmaker.store._sources import fetch_hub

    cache = tmp_path / "hf"
    repo = cache / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake = make_fake_model(tmp_path / "src")
    snap = repo / "snapshots" / commit
    for path in sorted(p for p in fake.rglob("*") if p.is_file()):
        rel = path.relative_to(fake)
        blob = repo / "blobs" / f"b{abs(hash(rel.as_posix()))}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    settings = Settings(home=tmp_path / "home", offline=True)
    folder = fetch_hub("org/tiny", settings, cache_dir=cache)
    assert folder == snap
    m = Store(settings.store_dir).import_folder(folder, name="tiny")
    assert m.digest == tree_digest(fake)


def test_store_does_not_import_torch(tmp_path: Path, fake_model_dir: Path) -> None:
    code = ("import sys; from pathlib import Path; from sdmaker.store import Store, package_model; "
            f"s = Store(Path({str(tmp_path / 'st')!r})); s.import_model({str(fake_model_dir)!r}, name='m'); "
            f"package_model(s.model_path('m'), {str(tmp_path / 'm.tar.gz')!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_waiting_for_the_lock_is_logged(tmp_path: Path, fake_model_dir: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    import threading

    from filelock import FileLock

    store = Store(tmp_path / "store")
    store.lock_log_every_s = 0.05
    holder = FileLock(str(tmp_path / "store" / ".lock"), thread_local=False)  # released by another thread
    (tmp_path / "store").mkdir()
    holder.acquire()
    released = threading.Event()

    def release_after_a_log() -> None:
        for _ in range(400):
            if any("still waiting for the store lock" in r.getMessage() for r in caplog.records):
                break
            threading.Event().wait(0.01)
        holder.release()
        released.set()

    threading.Thread(target=release_after_a_log, daemon=True).start()
    with caplog.at_level("WARNING", logger="sdmaker.store._store"):
        store.import_model(fake_model_dir, name="m")
    assert released.is_set()
    assert any("still waiting for the store lock" in r.getMessage() for r in caplog.records)
    assert store.get("m").name == "m"
