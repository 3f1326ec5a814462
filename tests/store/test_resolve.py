"""resolve_model: store names, folders, local archives (imported once), built-ins, hub ids."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest

from sdmaker.config import Settings
from sdmaker.errors import ModelNotFoundError, OfflineError
from sdmaker.files import tree_digest
from sdmaker.store import Store, package_model, resolve_model
from sdmaker.store import _store as store_module


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", offline=True)


def test_store_name_and_folder(settings: Settings, fake_model_dir: Path) -> None:
    Store(settings.store_dir).import_model(fake_model_dir, name="m")
    by_name = resolve_model("m", settings)
    assert by_name.name == "m" and by_name.digest == tree_digest(fake_model_dir)
    assert by_name.path == Store(settings.store_dir).model_path("m")
    by_path = resolve_model(str(fake_model_dir), settings)
    assert by_path.path == fake_model_dir and by_path.digest == by_name.digest


def test_local_archive_is_imported_once(settings: Settings, tmp_path: Path, fake_model_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "my-model.tar.zst"
    package_model(fake_model_dir, archive)
    first = resolve_model(str(archive), settings)
    assert first.name.startswith("my-model-")
    assert first.digest == tree_digest(first.path)
    calls = []
    monkeypatch.setattr(store_module.Store, "import_folder", lambda *a, **k: calls.append(a))
    assert resolve_model(str(archive), settings) == first
    assert calls == []


def test_builtin_assembled_on_first_use_and_refreshed_when_weights_change(
        settings: Settings, fake_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "packaged-weights"
    weights.mkdir()
    (weights / "unet.safetensors").write_bytes(b"v1")
    assembled: list[Path] = []

    def assemble(name: str, dest: Path) -> Path:
        shutil.copytree(fake_model_dir, dest)
        shutil.copy2(weights / "unet.safetensors", dest / "packaged.bin.txt")
        assembled.append(dest)
        return dest

    fake = types.ModuleType("sdmaker.models")
    fake.BUILTIN_NAMES = ("mini",)  # type: ignore[attr-defined]
    fake.assemble_builtin = assemble  # type: ignore[attr-defined]
    fake.is_builtin_ready = lambda name: True  # type: ignore[attr-defined]
    fake.builtin_dir = lambda name: weights  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sdmaker.models", fake)
    monkeypatch.setattr("sdmaker.models", fake, raising=False)
    resolved = resolve_model("mini", settings)
    assert resolved.name == "mini"
    assert Store(settings.store_dir).get("mini").source == f"builtin:mini@{tree_digest(weights)}"
    assert resolve_model("mini", settings) == resolved
    assert len(assembled) == 1  # unchanged weights: no second import
    (weights / "unet.safetensors").write_bytes(b"v2")  # an sdmaker update ships new weights
    refreshed = resolve_model("mini", settings)
    assert len(assembled) == 2 and refreshed.digest != resolved.digest
    assert (refreshed.path / "packaged.bin.txt").read_bytes() == b"v2"
    # a user's own model stored as "mini" is never replaced by the built-in
    Store(settings.store_dir).import_model(fake_model_dir, name="mini", overwrite=True)
    (weights / "unet.safetensors").write_bytes(b"v3")
    assert resolve_model("mini", settings).digest == tree_digest(fake_model_dir)
    assert len(assembled) == 2


def test_unknown_reference(settings: Settings) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model("no-such-model", settings)
    with pytest.raises(ModelNotFoundError):
        resolve_model("./missing/folder/x", settings)


def test_hub_id_offline(settings: Settings) -> None:
    with pytest.raises(OfflineError, match="offline"):
        resolve_model("stabilityai/stable-diffusion-2-1", settings)
