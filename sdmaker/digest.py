"""Content digests shared by the engine (recipes) and the store (content addressing).

A model's digest is the sha256 of its sorted ``"<sha256>  <relative path>"`` lines, so two copies
of the same files (a folder, its store import, its extracted ``model.tar.gz``) have one digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["EXCLUDED_NAMES", "file_sha256", "iter_model_files", "tree_digest", "tree_digest_of_hashes"]

_CHUNK = 8 * 1024 * 1024

#: Names never treated as part of a model (VCS metadata, OS clutter, Python caches).
EXCLUDED_NAMES = frozenset({".git", ".gitattributes", ".DS_Store", "__pycache__", ".ipynb_checkpoints"})


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (constant memory for multi-GB weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def iter_model_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (sorted, relative), skipping :data:`EXCLUDED_NAMES` and symlinks."""
    out: list[Path] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_NAMES for part in rel.parts):
            continue
        if path.is_symlink() or not path.is_file():
            continue
        out.append(rel)
    return out


def tree_digest_of_hashes(entries: Iterable[tuple[str, str]]) -> str:
    """Digest from ``(relative_posix_path, sha256)`` pairs."""
    h = hashlib.sha256()
    for rel, sha in sorted(entries):
        h.update(f"{sha}  {rel}\n".encode())
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """Digest of every model file under ``root`` (see module docstring)."""
    return tree_digest_of_hashes((rel.as_posix(), file_sha256(root / rel)) for rel in iter_model_files(root))
