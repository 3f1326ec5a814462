"""Small file-system primitives the store and packaging share: listing, hashing copies, atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from sdmaker.digest import EXCLUDED_NAMES

__all__ = ["PICKLE_SUFFIXES", "Progress", "atomic_write_text", "copy_hashing", "find_pickle_weights", "fsync_dir",
           "list_model_files", "unique_tmp"]

#: (bytes done, bytes total) callback for long copies, archives and transfers.
Progress = Callable[[int, int], None]

#: Suffixes of weight files that are unpickled on load. Same list as ``sdmaker.engine.PICKLE_SUFFIXES``,
#: repeated here because importing the engine imports torch, and the store must not.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

_CHUNK = 8 * 1024 * 1024


def list_model_files(root: Path) -> list[Path]:
    """Files of the model folder ``root`` as sorted relative paths.

    Skips :data:`sdmaker.digest.EXCLUDED_NAMES` like :func:`sdmaker.digest.tree_digest`. Symlinks to
    regular files are followed (``cp -L``), because Hugging Face cache snapshots are made of them;
    symlinks to folders are skipped so a link loop cannot make the walk endless.
    """
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_NAMES and not (base / d).is_symlink())
        for fname in filenames:
            if fname in EXCLUDED_NAMES:
                continue
            path = base / fname
            if path.is_file():  # follows symlinks; drops broken links, sockets, FIFOs
                out.append(path.relative_to(root))
    return sorted(out, key=lambda p: p.as_posix())


def find_pickle_weights(root: Path, files: list[Path] | None = None) -> list[Path]:
    """Relative paths of pickle-format weight files (``.bin``, ``.ckpt``, ``.pt``, ...) under ``root``."""
    return [p for p in (files if files is not None else list_model_files(root)) if p.suffix.lower() in PICKLE_SUFFIXES]


def unique_tmp(directory: Path, stem: str = "") -> Path:
    """A fresh temp path in ``directory``: pid + random suffix, so concurrent writers never share one
    (file locks can silently succeed for every caller on NFS-like file systems)."""
    return directory / f".tmp-{stem}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (the entry, not only the file data, must reach the disk)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_hashing(src: Path, dest: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy ``src`` to the new file ``dest`` while hashing it (one read pass); fsync. Returns (sha256, size)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while n := fin.readinto(buf):
            h.update(view[:n])
            fout.write(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), size


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(sha256, size) of ``path`` read in 8 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest(), size


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path.parent, path.name + "-")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` at ``dest``; copy when the file system refuses links (other device, no support)."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


__all__ += ["hash_file", "link_or_copy"]
