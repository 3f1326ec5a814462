"""The content-addressed local model store.

Layout under ``root`` (``settings.store_dir``)::

    blobs/<sha256>                 every distinct file once, read-only (shared across models)
    snapshots/<digest>/<path>      a normal diffusers folder of hard links into blobs/ (what loaders read)
    snapshots/<digest>.latent-preview.json   its fitted preview factors (``sdmaker model import`` writes it)
    manifests/<name>.json          one per model; writing it is the commit point of an import
    tmp/                           blob and snapshot staging; only touched under the lock
    staging/                       archive extraction / downloads before an import (private temp dirs)
    .lock                          file lock around every mutation

Readers (``list``, ``get``, ``model_path``) take no lock: manifests are replaced atomically and a
snapshot directory is renamed into place only once complete. A crash at any point before the manifest
rename leaves at most unreferenced blobs and tmp files, which the next mutation cleans up.

A new blob whose bytes the built-in S3 already holds (``settings.s3_dir/blobs/<sha256>``, the same content
addressing) is a hard link to that file, so a model uploaded to sdmaker's S3 and then imported is on disk
once (:mod:`sdmaker.serving.s3` links to the store's blobs the same way).

Nothing unverified becomes a blob: pickle weights are refused unless allowed, and every
``.safetensors`` file's header is checked (``_safetensors.check_safetensors``) on the bytes stored.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sdmaker import __version__
from sdmaker.config import Settings
from sdmaker.errors import (
    ModelExistsError,
    ModelFormatError,
    ModelNotFoundError,
    PickleRefusedError,
    StoreError,
    StoreIntegrityError,
)
from sdmaker.files import (
    MODEL_CARD_DEFAULT_KEYS,
    MODEL_CARD_FILE,
    PICKLE_SUFFIXES,
    PREVIEW_FACTORS_SUFFIX,
    Progress,
    atomic_write_text,
    copy_hashing,
    find_pickle_weights,
    fsync_dir,
    hash_file,
    link_or_copy,
    list_model_files,
    tree_digest_of_hashes,
    unique_tmp,
)
from sdmaker.store._manifest import LoraInfo, ManifestFile, ModelManifest, Tuning, read_architecture, validate_name
from sdmaker.store._safetensors import check_safetensors

__all__ = ["Store"]

logger = logging.getLogger(__name__)

_LOCK_LOG_EVERY_S = 10.0
_STALE_STAGING_S = 24 * 3600


class Store:
    """Models stored by content under ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path, *, settings: Settings | None = None) -> None:
        self.root = Path(root)
        self.settings = settings  # for S3 endpoints and offline mode when importing remote sources
        self.lock_log_every_s = _LOCK_LOG_EVERY_S
        self.blobs = self.root / "blobs"
        self.snapshots = self.root / "snapshots"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        self.staging = self.root / "staging"
        #: other content-addressed blob folders whose files may be shared by hard link (the built-in S3's)
        self.peer_blobs = [settings.s3_dir / "blobs"] if settings is not None else []

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # --- locking --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's mutation lock; logs every 10 s while another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / ".lock"))
        started = time.monotonic()
        while True:
            try:
                lock.acquire(timeout=self.lock_log_every_s)
                break
            except Timeout:
                logger.warning("still waiting for the store lock %s (%.0f s)", self.root / ".lock",
                               time.monotonic() - started)
        try:
            for d in (self.blobs, self.snapshots, self.manifests, self.tmp, self.staging):
                d.mkdir(parents=True, exist_ok=True)
            self._clean_tmp()  # anything in tmp/ now was left by a crashed process
            yield
        finally:
            lock.release()

    def _clean_tmp(self) -> None:
        for entry in self.tmp.iterdir():
            _remove(entry)

    # --- reading --------------------------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        return self.manifests / f"{validate_name(name)}.json"

    def exists(self, name: str) -> bool:
        """Whether a model called ``name`` is stored."""
        return self._manifest_path(name).is_file()

    def get(self, name: str) -> ModelManifest:
        """The manifest of ``name``; ``ModelNotFoundError`` listing the stored names when absent."""
        path = self._manifest_path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            names = [m.name for m in self.list()]
            raise ModelNotFoundError(
                f"no model named {name!r} in the store {self.root} "
                f"(stored: {', '.join(names) if names else 'none'}; import one with `sdmaker model import`)",
                model=name,
            ) from None
        try:
            return ModelManifest.from_json(text)
        except ValueError as exc:
            raise StoreIntegrityError(f"manifest {path} is corrupt: {exc}", model=name) from exc

    def list(self) -> list[ModelManifest]:
        """All stored models, sorted by name (corrupt manifests are logged and skipped)."""
        out: list[ModelManifest] = []
        if not self.manifests.is_dir():
            return out
        for path in sorted(self.manifests.glob("*.json")):
            try:
                out.append(ModelManifest.from_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                logger.warning("skipping unreadable manifest %s: %s", path, exc)
        return out

    def model_path(self, name: str) -> Path:
        """A diffusers folder with the files of ``name`` (hard links to blobs; rebuilt if missing)."""
        manifest = self.get(name)
        snap = self.snapshots / manifest.digest
        if not snap.is_dir():
            with self.lock():
                self._build_snapshot(manifest)
        return snap

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def verify(self, name: str) -> ModelManifest:
        """Re-hash every blob of ``name``; ``StoreIntegrityError`` naming the first bad file."""
        manifest = self.get(name)
        for f in manifest.files:
            blob = self.blob_path(f.sha256)
            if not blob.is_file():
                raise StoreIntegrityError(f"{name}: blob of {f.path} is missing ({blob})", model=name, path=f.path)
            sha, _ = hash_file(blob)
            if sha != f.sha256:
                raise StoreIntegrityError(f"{name}: {f.path} was modified on disk (sha256 {sha} != {f.sha256})",
                                          model=name, path=f.path)
        return manifest

    # --- writing --------------------------------------------------------------------------------

    def staging_dir(self, prefix: str = "import-") -> Path:
        """A private temp dir on the store's file system (for downloads and extraction before import)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.staging))

    def import_model(self, src: str | Path, *, name: str, allow_pickle: bool = False,
                     progress: Progress | None = None, overwrite: bool = False) -> ModelManifest:
        """Import a model folder, a local archive, an ``s3://`` URI or a hub id under ``name``.

        Folders are copied (the source is left untouched); archives and downloads are extracted into
        ``staging/`` first and moved into the blobs without a second copy.
        """
        from sdmaker.store._sources import open_source  # sources import S3/hub code lazily

        validate_name(name)
        if self.exists(name) and not overwrite:
            raise ModelExistsError(f"a model named {name!r} is already stored; pass --overwrite to replace it "
                                   "or choose another --name", model=name)
        with open_source(src, self, allow_pickle=allow_pickle, progress=progress, settings=self.settings) as (folder, movable, label):
            return self.import_folder(folder, name=name, allow_pickle=allow_pickle, progress=progress,
                                      overwrite=overwrite, move=movable, source=label)

    def import_folder(self, folder: Path, *, name: str, allow_pickle: bool = False, progress: Progress | None = None,
                      overwrite: bool = False, move: bool = False, source: str | None = None) -> ModelManifest:
        """Import the diffusers folder ``folder``. With ``move`` its files are moved (it must be on the
        store's file system and disposable: extracted archives, downloads)."""
        validate_name(name)
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"{folder} is not a folder", model=str(folder))
        if not (folder / "model_index.json").is_file() and not (folder / "code" / "inference.py").is_file():
            raise ModelFormatError(f"{folder} is not a model folder: it has neither model_index.json (a diffusers "
                                   "model: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
                                   "nor code/inference.py (a SageMaker-style handler)", model=str(folder))
        files = list_model_files(folder)
        pickles = find_pickle_weights(folder, files)
        if pickles and not allow_pickle:
            raise PickleRefusedError(
                f"{folder} holds pickle weights ({', '.join(p.as_posix() for p in pickles[:3])}"
                f"{', ...' if len(pickles) > 3 else ''}); unpickling can run arbitrary code. Convert them to "
                "safetensors (or delete them if safetensors copies exist), or pass --allow-pickle if you trust "
                "the source.", model=str(folder), files=[p.as_posix() for p in pickles])
        where = source if source is not None else str(folder)
        checked = {rel: f"{rel.as_posix()} (in {where})" for rel in files if rel.suffix.lower() == ".safetensors"}
        for rel, label in checked.items():  # fail fast, before gigabytes are copied; re-checked as stored
            check_safetensors(folder / rel, name=label)
        arch, prediction_type, defaults = read_architecture(folder)
        total = sum((folder / rel).stat().st_size for rel in files)
        done = 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        with self.lock():
            if self.exists(name) and not overwrite:
                raise ModelExistsError(f"a model named {name!r} is already stored; pass --overwrite to replace it",
                                       model=name)
            created: list[Path] = []
            snap: Path | None = None
            new_snapshot = False
            try:
                entries = [self._add_blob(folder / rel, on_bytes, move=move, created=created,
                                          check_as=checked.get(rel)) for rel in files]
                manifest_files = [ManifestFile(path=rel.as_posix(), sha256=sha, size=size)
                                  for rel, (sha, size) in zip(files, entries, strict=True)]
                manifest = ModelManifest(
                    name=name,
                    digest=tree_digest_of_hashes((f.path, f.sha256) for f in manifest_files),
                    files=manifest_files,
                    total_size=sum(f.size for f in manifest_files),
                    architecture=arch,
                    prediction_type=prediction_type,
                    defaults=defaults,
                    source=source if source is not None else str(folder),
                    sdmaker_version=__version__,
                )
                snap = self.snapshots / manifest.digest
                new_snapshot = not snap.is_dir()
                self._build_snapshot(manifest)
                atomic_write_text(self._manifest_path(name), manifest.to_json())  # the commit point
            except BaseException:
                if new_snapshot and snap is not None:
                    _remove(snap)
                for blob in created:
                    blob.unlink(missing_ok=True)
                raise
            self._gc()  # an overwrite may have orphaned blobs and a snapshot
        logger.info("imported %s (%d files, %d bytes, digest %s)", name, len(manifest.files), manifest.total_size,
                    manifest.digest[:12])
        return manifest

    # --- LoRA adapters (kind ``lora``) ------------------------------------------------------------

    def import_lora(self, src: Path, *, name: str, base: str | None = None, base_digest: str | None = None,
                    base_unet: Path | None = None, overwrite: bool = False,
                    base_weights_digest: str | None = None) -> ModelManifest:
        """Import the LoRA adapter file ``src`` (``.safetensors``) under ``name``, as a store object of kind ``lora``.

        Its key layout is normalised (:func:`~sdmaker.store.parse_lora`); with ``base_unet`` (the base model's
        ``unet/`` folder) every layer is checked against the base's module names and weight shapes, and
        ``base``/``base_digest``/``base_weights_digest`` are recorded: a model of another weights digest
        (another digest, for an adapter recorded without one) refuses the adapter at request time.
        The file is stored unchanged (its sha256 is the digest recipes quote) as ``LORA_FILE``.
        """
        from sdmaker.store._lora import LORA_FILE, check_lora_base, read_lora, unet_weight_shapes

        validate_name(name)
        src = Path(src)
        if not src.is_file():
            raise ModelNotFoundError(f"{src} is not a file", model=str(src))
        if src.suffix.lower() in PICKLE_SUFFIXES:
            raise PickleRefusedError(f"{src} is a pickle file; unpickling can run arbitrary code. Convert it to "
                                     ".safetensors, or pass --allow-pickle if you trust the source.", model=str(src))
        if src.suffix.lower() != ".safetensors":
            raise ModelFormatError(f"{src}: a LoRA adapter must be a .safetensors file", model=str(src))
        shapes = unet_weight_shapes(base_unet) if base_unet is not None else None
        layout = read_lora(src, unet_modules=shapes)
        if shapes is not None:
            check_lora_base(layout, shapes, base=base or str(base_unet))
        with self.lock():
            if self.exists(name) and not overwrite:
                raise ModelExistsError(f"a model named {name!r} is already stored; pass --overwrite to replace it "
                                       "or choose another --name", model=name)
            created: list[Path] = []
            try:
                sha, size = self._add_blob(src, None, move=False, created=created, check_as=str(src))
                files = [ManifestFile(path=LORA_FILE, sha256=sha, size=size)]
                manifest = ModelManifest(
                    name=name, digest=tree_digest_of_hashes((f.path, f.sha256) for f in files), files=files,
                    total_size=size, source=str(src), sdmaker_version=__version__, kind="lora",
                    lora=LoraInfo(file=LORA_FILE, sha256=sha, layout=layout.layout, rank=layout.rank,
                                  alpha=layout.alpha, target_modules=layout.target_modules, base=base,
                                  base_digest=base_digest, base_weights_digest=base_weights_digest))
                self._build_snapshot(manifest)
                atomic_write_text(self._manifest_path(name), manifest.to_json())  # the commit point
            except BaseException:
                for blob in created:
                    blob.unlink(missing_ok=True)
                raise
            self._gc()
        logger.info("imported LoRA %s (%s layout, rank %d, %d layers, base %s)", name, layout.layout, layout.rank,
                    len(layout.layers), base or "not named")
        return manifest

    def lora_path(self, name: str) -> tuple[ModelManifest, Path]:
        """The manifest and adapter file of the LoRA ``name``; ``ModelNotFoundError`` when it is not one."""
        manifest = self.get(name)
        if manifest.kind != "lora" or manifest.lora is None:
            raise ModelNotFoundError(f"{name!r} is a {manifest.kind} in the store, not a LoRA adapter", model=name)
        return manifest, self.model_path(name) / manifest.lora.file

    # --- tuned recipes (``sdmaker model tune``) -----------------------------------------------------

    def set_tuned(self, name: str, defaults: dict[str, Any], *, dtype: str | None, record: dict[str, Any]) -> ModelManifest:
        """Write a tuned recipe into ``name``'s ``sdmaker.json``: the defaults every loader of the model applies.

        The card as imported stays the base (a second tune replaces the first, it does not stack); its
        ``defaults`` get ``defaults`` on top, ``dtype`` (the precision that kept the pictures) is set, and
        ``tuned`` holds ``record``. The card is a file of the model, so the digest changes and everything
        that loads the model from the store (generate, serve, endpoints, batch and async workers, packaged
        artifacts) sees the tuned recipe without being told.
        """
        unknown = sorted(set(defaults) - set(MODEL_CARD_DEFAULT_KEYS))
        if unknown:
            raise StoreError(f"tuned defaults may only set {', '.join(MODEL_CARD_DEFAULT_KEYS)}; got {', '.join(unknown)}",
                             model=name)
        with self.lock():
            manifest = self.get(name)
            before = manifest.tuning.card_before if manifest.tuning else _card_entry(manifest)
            base = self._read_card(before)
            raw = base.get("defaults")
            base_defaults: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
            card = {**base, "defaults": {**base_defaults, **defaults}, "tuned": {**record, "defaults_before": base_defaults}}
            if dtype is None:
                card.pop("dtype", None)
            else:
                card["dtype"] = dtype
            text = json.dumps(card, indent=2, sort_keys=False) + "\n"
            tmp = unique_tmp(self.tmp, "card-")
            tmp.write_text(text, encoding="utf-8")
            created: list[Path] = []
            sha, size = self._add_blob(tmp, None, move=True, created=created)
            tmp.unlink(missing_ok=True)  # left behind when an identical card blob already existed
            entry = ManifestFile(path=MODEL_CARD_FILE, sha256=sha, size=size)
            return self._replace_card(manifest, entry, Tuning(card_before=before, record=record))

    def reset_tuned(self, name: str) -> ModelManifest:
        """Undo :meth:`set_tuned`: the model card (and so the digest) as imported. A no-op when not tuned."""
        with self.lock():
            manifest = self.get(name)
            if manifest.tuning is None:
                return manifest
            return self._replace_card(manifest, manifest.tuning.card_before, None)

    def _read_card(self, entry: ManifestFile | None) -> dict[str, Any]:
        if entry is None:
            return {}
        try:
            data = json.loads(self.blob_path(entry.sha256).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreIntegrityError(f"the model card blob {entry.sha256} is unreadable: {exc}",
                                      path=MODEL_CARD_FILE) from exc
        return data if isinstance(data, dict) else {}

    def _replace_card(self, manifest: ModelManifest, card: ManifestFile | None, tuning: Tuning | None) -> ModelManifest:
        """Commit ``manifest`` with its card file replaced by ``card`` (None: no card). Lock held."""
        files = [f for f in manifest.files if f.path != MODEL_CARD_FILE] + ([card] if card is not None else [])
        files.sort(key=lambda f: f.path)
        raw = self._read_card(card).get("defaults")
        defaults = {k: v for k, v in raw.items() if k in MODEL_CARD_DEFAULT_KEYS} if isinstance(raw, dict) else {}
        updated = manifest.model_copy(update={
            "files": files, "digest": tree_digest_of_hashes((f.path, f.sha256) for f in files),
            "total_size": sum(f.size for f in files), "defaults": defaults, "tuning": tuning,
        })
        self._build_snapshot(updated)
        atomic_write_text(self._manifest_path(manifest.name), updated.to_json())  # the commit point
        self._gc()
        logger.info("%s: model card %s (digest %s)", manifest.name, "tuned" if tuning else "restored",
                    updated.digest[:12])
        return updated

    def remove(self, name: str) -> ModelManifest:
        """Delete ``name`` and garbage-collect the blobs no other model uses."""
        with self.lock():
            manifest = self.get(name)
            self._manifest_path(name).unlink()
            fsync_dir(self.manifests)
            self._gc()
        return manifest

    def gc(self) -> int:
        """Remove unreferenced blobs, snapshots and stale staging dirs; returns the bytes freed."""
        with self.lock():
            return self._gc()

    # --- internals (call with the lock held) ----------------------------------------------------

    def _add_blob(self, src: Path, callback: Callable[[int], None] | None, *, move: bool,
                  created: builtins.list[Path], check_as: str | None = None) -> tuple[str, int]:
        """Store ``src`` as a blob; ``check_as``: verify the stored bytes as safetensors (named so)."""
        if move and not src.is_symlink():
            if check_as is not None:
                check_safetensors(src, name=check_as)
            sha, size = hash_file(src, callback)
            blob = self.blob_path(sha)
            if blob.exists():
                return sha, size
            if self._link_peer(sha, blob):
                created.append(blob)
                return sha, size
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(src, 0o444)
            os.replace(src, blob)
        else:
            tmp = unique_tmp(self.tmp, "blob-")
            try:
                sha, size = copy_hashing(src, tmp, callback)
                if check_as is not None:  # the copy is what gets stored: the source may have changed since
                    check_safetensors(tmp, name=check_as)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            blob = self.blob_path(sha)
            if blob.exists():  # dedup: identical content is stored once
                tmp.unlink()
                return sha, size
            if self._link_peer(sha, blob):
                tmp.unlink()
                created.append(blob)
                return sha, size
            os.chmod(tmp, 0o444)  # blobs are shared through hard links: never edit one in place
            os.replace(tmp, blob)
        created.append(blob)
        fsync_dir(self.blobs)
        return sha, size

    def _link_peer(self, sha: str, blob: Path) -> bool:
        """Hard-link a peer's file with digest ``sha`` as ``blob`` (both are read-only content addresses).

        The peer's bytes are re-hashed first: a link shares the inode, so they must be exactly what the name says.
        """
        for peer in self.peer_blobs:
            candidate = peer / sha
            try:
                if not candidate.is_file() or hash_file(candidate)[0] != sha:
                    continue
                os.link(candidate, blob)
            except OSError:
                continue
            fsync_dir(self.blobs)
            return True
        return False

    def _build_snapshot(self, manifest: ModelManifest) -> Path:
        snap = self.snapshots / manifest.digest
        if snap.is_dir():
            return snap
        work = unique_tmp(self.tmp, "snap-")
        work.mkdir()
        try:
            for f in manifest.files:
                blob = self.blob_path(f.sha256)
                if not blob.is_file():
                    raise StoreIntegrityError(f"{manifest.name}: blob of {f.path} is missing ({blob})",
                                              model=manifest.name, path=f.path)
                dest = work / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(blob, dest)
            os.replace(work, snap)
            fsync_dir(self.snapshots)
        finally:
            if work.exists():
                _remove(work)
        return snap

    def _gc(self) -> int:
        manifests = self.list()
        live_blobs = {f.sha256 for m in manifests for f in m.files}
        live_blobs |= {m.tuning.card_before.sha256 for m in manifests if m.tuning and m.tuning.card_before}
        live_snaps = {m.digest for m in manifests}
        freed = 0
        for snap in list(self.snapshots.iterdir()) if self.snapshots.is_dir() else []:
            # a snapshot's latent-preview factors (sdmaker.files.preview_factors_path) live and die with it
            if snap.name.removesuffix(PREVIEW_FACTORS_SUFFIX) not in live_snaps:
                _remove(snap)
        for blob in list(self.blobs.iterdir()) if self.blobs.is_dir() else []:
            if blob.name not in live_blobs:
                freed += blob.stat().st_size
                blob.unlink()
        now = time.time()
        for entry in list(self.staging.iterdir()) if self.staging.is_dir() else []:
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > _STALE_STAGING_S:
                    _remove(entry)
        if freed:
            logger.info("store gc freed %d bytes", freed)
        return freed


def _card_entry(manifest: ModelManifest) -> ManifestFile | None:
    return next((f for f in manifest.files if f.path == MODEL_CARD_FILE), None)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:  # pragma: no cover - best effort cleanup
        raise StoreError(f"could not remove {path}: {exc}", path=str(path)) from exc
