"""``resolve_model``: any model reference users type, turned into a local diffusers folder.

Order of interpretation (first match wins):

1. ``s3://bucket/key.tar.gz`` (an artifact) or ``s3://bucket/prefix/`` (an uncompressed folder);
2. a store name (``sdmaker model list``);
3. a local diffusers folder, or a local ``.tar`` / ``.tar.gz`` / ``.tar.zst`` artifact;
4. a built-in model name (``sdmaker.models.BUILTIN_NAMES``), assembled and imported on first use;
5. a hub id ``org/name`` (the Hugging Face cache, or the network when online).

Archives and S3 sources are imported into the store under a name derived from the file name plus a
short key of where they came from (path + size + mtime, or the S3 ETags), so resolving them again is
a manifest lookup, not a second download or extraction.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdmaker.config import Settings
from sdmaker.errors import ModelNotFoundError
from sdmaker.files import Progress, model_digests, tree_digest
from sdmaker.store._manifest import NAME_PATTERN
from sdmaker.store._s3 import is_s3_uri, parse_s3_uri
from sdmaker.store._sources import HUB_ID, archive_stem, fetch_hub, is_archive_name
from sdmaker.store._store import Store

__all__ = ["ResolvedModel", "resolve_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A loadable folder plus the name and content digest to report for it.

    ``weights_digest``: the digest of the files LoRA adapters depend on (:func:`sdmaker.files.weights_digest`),
    what ``model import --base`` records for an adapter.
    """

    path: Path
    name: str
    digest: str
    weights_digest: str | None = None


def _derived_name(stem: str, key: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._+-]", "-", stem).strip(".-_") or "model"
    return f"{clean[:100]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _from_store(store: Store, name: str) -> ResolvedModel:
    manifest = store.get(name)
    if manifest.kind != "model":
        raise ModelNotFoundError(f"{name!r} is a {manifest.kind} adapter in the store, not a model: choose a base "
                                 f"model and ask for the adapter per request (loras: [{{\"name\": \"{name}\"}}], "
                                 f"or --lora {name})", model=name)
    return ResolvedModel(path=store.model_path(name), name=name, digest=manifest.digest,
                         weights_digest=manifest.weights_digest)


def _import_cached(store: Store, src: str, name: str, *, allow_pickle: bool,
                   progress: Progress | None) -> ResolvedModel:
    if not store.exists(name):
        logger.info("importing %s into the store as %s", src, name)
        with contextlib.suppress(FileExistsError):  # a concurrent resolve imported it first
            store.import_model(src, name=name, allow_pickle=allow_pickle, progress=progress)
    return _from_store(store, name)


def _s3_name(uri: str, settings: Settings) -> str:
    from sdmaker.store._s3 import client_for, head, list_keys

    client = client_for(settings)
    _, key = parse_s3_uri(uri)
    if is_archive_name(key):
        info = head(uri, client=client)
        return _derived_name(archive_stem(key), f"{uri}|{info.get('ETag')}|{info.get('ContentLength')}")
    prefix_uri = uri if uri.endswith("/") else uri + "/"
    listing = list_keys(prefix_uri, client=client)
    if not listing:
        raise ModelNotFoundError(f"{prefix_uri} holds no objects", model=uri)
    return _derived_name(archive_stem(key) or parse_s3_uri(uri).bucket, f"{prefix_uri}|{sorted(listing)}")


def _builtin(ref: str, store: Store, settings: Settings, *, progress: Progress | None) -> ResolvedModel | None:
    """Built-in model ``ref`` from the store, (re-)imported when the installed weights changed.

    The manifest's source records the digest of the packaged weights (``builtin:mini@<digest>``), so an
    sdmaker update with new weights replaces a stale copy; a user's own model stored under the same name
    (any other source) is left alone.
    """
    try:
        from sdmaker import models
    except ImportError:
        return None
    if ref not in getattr(models, "BUILTIN_NAMES", ()):
        return None
    if not models.is_builtin_ready(ref):
        if store.exists(ref):
            return _from_store(store, ref)
        raise ModelNotFoundError(f"the weights of built-in model {ref!r} are not in this sdmaker install "
                                 f"({models.builtin_dir(ref)}); reinstall sdmaker or train them (sdmaker train)",
                                 model=ref)
    source = f"builtin:{ref}@{tree_digest(models.builtin_dir(ref))}"
    if store.exists(ref):
        current = store.get(ref).source or ""
        if current == source or not current.startswith("builtin:"):
            return _from_store(store, ref)
    staging = store.staging_dir("builtin-")
    try:
        folder = models.assemble_builtin(ref, staging / ref)
        store.import_folder(folder, name=ref, move=True, progress=progress, source=source, overwrite=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _from_store(store, ref)


def resolve_model(ref: str, settings: Settings, *, allow_pickle: bool = False,
                  progress: Progress | None = None) -> ResolvedModel:
    """Resolve ``ref`` (see the module docstring) to a local diffusers folder.

    Raises:
        ModelNotFoundError: nothing matches ``ref`` (the message lists what was tried).
        OfflineError: a hub id that is not cached while offline.
        PickleRefusedError / ArchiveError / S3Error: from importing the source.
    """
    ref = str(ref)
    store = Store(settings.store_dir, settings=settings)
    if is_s3_uri(ref):
        return _import_cached(store, ref, _s3_name(ref, settings), allow_pickle=allow_pickle, progress=progress)
    builtin = _builtin(ref, store, settings, progress=progress)
    if builtin is not None:
        return builtin
    if NAME_PATTERN.match(ref) and store.exists(ref):
        return _from_store(store, ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        digest, weights = model_digests(path)
        return ResolvedModel(path=path, name=path.resolve().name, digest=digest, weights_digest=weights)
    if path.is_file():
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return _import_cached(store, str(path), _derived_name(archive_stem(path.name), key),
                              allow_pickle=allow_pickle, progress=progress)
    if HUB_ID.match(ref):
        folder = fetch_hub(ref, settings)
        digest, weights = model_digests(folder)
        return ResolvedModel(path=folder, name=ref, digest=digest, weights_digest=weights)
    stored = [m.name for m in store.list()]
    raise ModelNotFoundError(
        f"model {ref!r} not found: it is not a store name (stored: {', '.join(stored) if stored else 'none'}), "
        "a local folder or archive, an s3:// URI, a built-in model, nor a hub id (org/name)", model=ref)
