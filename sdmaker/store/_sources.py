"""Turn an import source (folder, archive, ``s3://`` URI, hub id) into a local folder to import."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sdmaker.config import Settings, load_settings
from sdmaker.errors import ModelNotFoundError, OfflineError
from sdmaker.files import Progress
from sdmaker.store._archive import safe_extract
from sdmaker.store._s3 import is_s3_uri, parse_s3_uri

if TYPE_CHECKING:
    from sdmaker.store._store import Store

__all__ = ["ARCHIVE_SUFFIXES", "HUB_ID", "archive_stem", "fetch_hub", "is_archive_name", "open_source"]

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar")
#: ``org/name`` as on the Hugging Face hub.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: Only what a diffusers folder needs: no root-level single-file checkpoints, no pickle, no EMA/fp16 twins.
_HUB_ALLOW = ["model_index.json", "sdmaker.json", "*/*.safetensors", "*/*.json", "*/*.txt", "*/*.model"]
_HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.ema.*"]


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    """``model`` for ``.../model.tar.gz``."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    for suffix in ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def fetch_hub(repo_id: str, settings: Settings, *, cache_dir: Path | None = None) -> Path:
    """Local snapshot folder of hub model ``repo_id``: the HF cache first, the network only when online.

    Offline (``SDMAKER_OFFLINE``/``HF_HUB_OFFLINE``) with nothing cached fails at once with ``OfflineError``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    kwargs = {"allow_patterns": _HUB_ALLOW, "ignore_patterns": _HUB_IGNORE,
              "cache_dir": str(cache_dir) if cache_dir is not None else None}
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))  # type: ignore[call-overload]
    except Exception as exc:  # noqa: BLE001 - any cache miss falls through to the network (or OfflineError)
        cache_miss = exc
    todo = ("Import a local copy instead (`sdmaker model import ./folder-or-model.tar.gz --name NAME`), or run "
            "once with network access to fill the Hugging Face cache")
    if settings.offline:
        raise OfflineError(f"hub model {repo_id!r} is not in the local Hugging Face cache and sdmaker is offline "
                           f"(SDMAKER_OFFLINE/HF_HUB_OFFLINE is set). {todo}.", model=repo_id) from cache_miss
    try:
        return Path(snapshot_download(repo_id, **kwargs))  # type: ignore[call-overload]
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFoundError(f"hub model {repo_id!r} does not exist or needs access rights ({exc})",
                                 model=repo_id) from exc
    except Exception as exc:  # noqa: BLE001 - connection errors of any HTTP stack mean: no usable network
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise OfflineError(f"hub model {repo_id!r} is not in the local Hugging Face cache and could not be "
                           f"downloaded ({type(exc).__name__}: {first_line}). {todo}.", model=repo_id) from exc


@contextlib.contextmanager
def open_source(src: str | Path, store: Store, *, allow_pickle: bool = False, progress: Progress | None = None,
                settings: Settings | None = None) -> Iterator[tuple[Path, bool, str]]:
    """Yield ``(folder, movable, label)`` for an import source; temporary copies are removed afterwards.

    ``movable`` says the folder is a private staging copy whose files the store may move into blobs.
    """
    del allow_pickle  # the store checks the resulting folder itself
    text = str(src)
    staging: Path | None = None
    try:
        if is_s3_uri(text):
            settings = settings or load_settings()
            from sdmaker.store._s3 import client_for, download, download_prefix

            client = client_for(settings)
            _, key = parse_s3_uri(text)
            staging = store.staging_dir()
            if is_archive_name(key):
                archive = download(text, staging / f"download-{archive_stem(key)}.tar", progress, client=client)
                folder = staging / "model"
                safe_extract(archive, folder, progress=progress)
                archive.unlink()
            else:
                folder = staging / "model"
                download_prefix(text, folder, progress, client=client)
            yield folder, True, text
            return
        path = Path(text).expanduser()
        if path.is_dir():
            yield path, False, str(path.resolve())
            return
        if path.is_file():
            staging = store.staging_dir()
            folder = staging / "model"
            safe_extract(path, folder, progress=progress)
            yield folder, True, str(path.resolve())
            return
        if HUB_ID.match(text):
            folder = fetch_hub(text, settings or load_settings())
            yield folder, False, f"hf://{text}"
            return
        raise ModelNotFoundError(f"{text!r} is not a folder, an archive, an s3:// URI nor a hub id (org/name)",
                                 model=text)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
