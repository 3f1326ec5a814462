"""Models reach Ray nodes by digest, with no shared file system.

The daemon serves each model an endpoint runs on Ray as an uncompressed tar of its files
(:func:`tar_stream`, route ``GET /sdmaker/v1/artifacts/{digest}``, a bearer token only replicas get).
A replica calls :func:`node_model` on its node: the node's cache (``<cache>/<node id>/models/<digest>``)
when a replica there fetched it already, else the model's S3 source (when it came from S3) or the
daemon's copy, verified against the digest (the store's tree digest: sha256 of every file) before it is
renamed into place. A second replica on the same node waits on the same file lock and copies nothing.

The cache is keyed by Ray node id so that two nodes on one machine (tests, a laptop) still each fetch
their own copy, as separate machines would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdmaker.errors import ModelError
from sdmaker.files import list_model_files, tree_digest

__all__ = ["ARTIFACT_ROUTE", "FetchedModel", "node_model", "tar_stream"]

logger = logging.getLogger(__name__)

#: The daemon route a replica downloads a model from (``{digest}`` filled in).
ARTIFACT_ROUTE = "/sdmaker/v1/artifacts/{digest}"
_CHUNK = 1024 * 1024


def tar_stream(folder: Path) -> Iterator[bytes]:
    """The model files of ``folder`` (what its digest covers) as an uncompressed tar, a chunk at a time.

    Weights are already compressed or incompressible: gzip would only cost the daemon's CPU.
    """
    for rel in list_model_files(folder):
        path = folder / rel
        size = path.stat().st_size
        info = tarfile.TarInfo(rel.as_posix())
        info.size, info.mode, info.mtime = size, 0o644, 0
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        sent = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                sent += len(chunk)
                yield chunk
        if sent != size:
            raise OSError(f"{path} changed size while it was being sent")
        if size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


@dataclass(frozen=True)
class FetchedModel:
    """Where a replica's model is on its node, and how it got there (``endpoint describe`` shows it)."""

    path: Path
    how: str  # "node cache", "head (N bytes)", "s3"
    seconds: float


def _download(url: str, token: str, dest: Path) -> int:
    import httpx

    size = 0
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(60.0)) as r:
        if r.status_code != 200:
            raise ModelError(f"fetching the model from the daemon ({url}) answered HTTP {r.status_code}: "
                             f"{r.read()[:300].decode(errors='replace')}")
        with open(dest, "wb") as fh:
            for chunk in r.iter_bytes(_CHUNK):
                fh.write(chunk)
                size += len(chunk)
    return size


def node_model(digest: str, *, cache: Path, head_url: str, token: str, s3_uri: str | None = None,
               s3_settings: object | None = None) -> FetchedModel:
    """The model ``digest`` as a folder on this node: cached, else from S3 or the daemon, verified first.

    Raises:
        ModelError: the download failed or what arrived does not have ``digest``.
    """
    from filelock import FileLock

    started = time.monotonic()
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / digest
    with FileLock(str(models / f"{digest}.lock")):
        if final.is_dir():
            return FetchedModel(final, "node cache", time.monotonic() - started)
        staging = Path(tempfile.mkdtemp(prefix=f".fetch-{digest[:12]}-", dir=models))
        try:
            if s3_uri:
                how = _from_s3(s3_uri, staging, s3_settings)
            else:
                archive = staging / "model.tar"
                size = _download(head_url.rstrip("/") + ARTIFACT_ROUTE.format(digest=digest), token, archive)
                from sdmaker.store._archive import safe_extract

                safe_extract(archive, staging / "model")
                archive.unlink()
                how = f"head ({size} bytes)"
            got = tree_digest(staging / "model")
            if got != digest:
                raise ModelError(f"the model fetched for this replica has digest {got[:16]}..., expected "
                                 f"{digest[:16]}... ({how}); refusing to serve it")
            os.replace(staging / "model", final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("model %s fetched from %s in %.1f s", digest[:12], how, time.monotonic() - started)
    return FetchedModel(final, how, time.monotonic() - started)


def _from_s3(uri: str, staging: Path, settings: object | None) -> str:
    """Download and unpack ``uri`` (an artifact or a prefix) into ``staging/model`` with the store's importer."""
    from sdmaker.config import Settings, load_settings
    from sdmaker.store import Store

    base = settings if isinstance(settings, Settings) else load_settings()
    store = Store(staging / "store", settings=base)
    manifest = store.import_model(uri, name="fetched")
    src = store.model_path("fetched")
    dest = staging / "model"
    dest.mkdir()
    for f in manifest.files:  # hard links out of the temporary store, which is removed afterwards
        target = dest / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.link(src / f.path, target)
    return "s3"
