"""File and identity helpers: atomic writes, directory swaps, the one model-file walker and digest.

Torch-free on purpose: the store, the client, the CLI, training and serving all write files and
identify models, and none of them should pay for (or depend on) an engine import.

**Writes.** Everything sdmaker stores is written to a temp file in the destination's folder, fsynced,
then renamed over the destination (``os.replace``), so a reader sees the old or the new content and
never a torn file, even after a crash. Folders are built beside their destination and swapped in whole.
A file that must never replace another (a user's image, the local key) goes through :func:`write_once`.

**Identity.** A model's digest is the sha256 of its sorted ``"<sha256>  <relative path>"`` lines
(:func:`tree_digest`), so two copies of the same files (a folder, its store import, its extracted
``model.tar.gz``, a Hugging Face cache snapshot) have one digest. A model's *weights digest*
(:func:`weights_digest`) is the same digest over only the files a LoRA adapter depends on, so rewriting
the model card (``sdmaker model tune``) changes the digest but not the weights digest. Every caller lists
a model's files with :func:`list_model_files`, which has the one symlink rule:

- a symlink is followed when its target stays inside the model folder, or, for a Hugging Face cache
  snapshot (``models--org--name/snapshots/<rev>/...``), inside that repository's cache folder (its
  files are links into ``../../blobs/``);
- any other symlink (one leaving the folder, or a dangling one) is refused with ``ModelFormatError``:
  silently skipping it would make a model lose a file, and following it would let a folder pull
  arbitrary files (``~/.ssh/...``) into the store and into uploaded artifacts;
- a folder symlink that points at one of its own ancestors (a loop) is refused too.

**Pickle policy.** Weight files with a :data:`PICKLE_SUFFIXES` suffix (compared case-insensitively:
``MODEL.BIN`` is a pickle too) are unpickled on load, which runs arbitrary code; the store refuses them
and the loader refuses them without ``allow_pickle``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from sdmaker.errors import ModelFormatError

__all__ = [
    "ADAPTER_BASE_COMPONENTS",
    "EXCLUDED_NAMES",
    "MODEL_CARD_DEFAULT_KEYS",
    "MODEL_CARD_FILE",
    "PICKLE_SUFFIXES",
    "PREVIEW_FACTORS_SUFFIX",
    "WEIGHT_SUFFIXES",
    "Progress",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "copy_hashing",
    "find_pickle_weights",
    "fsync_dir",
    "hash_file",
    "preview_factors_path",
    "is_pickle_weight",
    "is_weight_file",
    "link_or_copy",
    "list_model_files",
    "pid_alive",
    "model_digests",
    "replace_dir",
    "staged_dir",
    "tree_digest",
    "tree_digest_of_hashes",
    "unique_tmp",
    "weights_digest",
    "weights_digest_of_hashes",
    "write_once",
]

#: (bytes done, bytes total) callback for long copies, archives and transfers.
Progress = Callable[[int, int], None]

#: Names never treated as part of a model (VCS metadata, OS clutter, Python caches).
EXCLUDED_NAMES = frozenset({".git", ".gitattributes", ".DS_Store", "__pycache__", ".ipynb_checkpoints"})

#: Suffixes of weight files that are unpickled on load (lower case; see :func:`is_pickle_weight`).
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

#: Suffixes of weight files of any format (lower case): large, incompressible, never text.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".onnx", ".msgpack", ".h5", ".gguf", ".npz", ".npy", *PICKLE_SUFFIXES})

#: Optional sdmaker metadata beside ``model_index.json``: ``{"name": ..., "defaults": {height, width, ...}}``.
#: The engine applies its defaults to requests, the store shows them, the worker names the model by it.
MODEL_CARD_FILE = "sdmaker.json"

#: The request fields a model card's ``defaults`` may set (any other key there is ignored).
MODEL_CARD_DEFAULT_KEYS = ("height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt",
                           "scheduler", "deep_cache_interval")

_CHUNK = 8 * 1024 * 1024

#: Suffix of the file beside a model folder that keeps its fitted latent-preview factors (JSON).
PREVIEW_FACTORS_SUFFIX = ".latent-preview.json"


def preview_factors_path(model_dir: Path) -> Path:
    """Where the latent-preview factors of the model at ``model_dir`` are kept: a file beside the folder.

    Beside, not inside: a file added inside would change the model's digest. The store keeps one per
    snapshot (``snapshots/<digest>.latent-preview.json``), so identical models share their factors.
    """
    model_dir = Path(model_dir)
    return model_dir.parent / f"{model_dir.name}{PREVIEW_FACTORS_SUFFIX}"


# --- the pickle policy and weight suffixes ------------------------------------------------------


def is_pickle_weight(path: str | Path) -> bool:
    """Whether ``path`` names a pickle-format weight file (suffix in :data:`PICKLE_SUFFIXES`, any case)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def is_weight_file(path: str | Path) -> bool:
    """Whether ``path`` names a weight file of any format (suffix in :data:`WEIGHT_SUFFIXES`, any case)."""
    return Path(path).suffix.lower() in WEIGHT_SUFFIXES


def find_pickle_weights(root: Path, files: Iterable[Path] | None = None) -> list[Path]:
    """Relative paths of pickle-format weight files under ``root`` (``files``: a listing already made)."""
    return [p for p in (files if files is not None else list_model_files(root)) if is_pickle_weight(p)]


# --- the walker ----------------------------------------------------------------------------------


def _hf_repo_of(root: Path) -> Path | None:
    """The cache folder of the Hugging Face repository ``root`` is a snapshot (or part of one) of.

    The hub cache lays a repository out as ``models--org--name/{blobs,refs,snapshots/<rev>}``, and
    snapshot files are relative links into ``blobs/``.
    """
    for parent in root.parents:
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            return parent.parent
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def list_model_files(root: Path) -> list[Path]:
    """Files of the model folder ``root`` as sorted relative paths (the module docstring has the rules).

    Skips :data:`EXCLUDED_NAMES`, sockets and FIFOs. Raises ``ModelFormatError`` naming the link for a
    symlink that leaves ``root`` (and the Hugging Face cache), dangles or loops.
    """
    root = Path(root)
    real_root = root.resolve()
    allowed = [real_root]
    repo = _hf_repo_of(real_root)
    if repo is not None:
        allowed.append(repo)
    out: list[Path] = []

    def refuse(path: Path, why: str) -> ModelFormatError:
        rel = path.relative_to(root).as_posix()
        return ModelFormatError(f"{root}: symlink {rel!r} {why}; replace it with the file itself "
                                "(cp -L) or remove it", model=str(root), path=rel, reason="symlink")

    def walk(folder: Path, real_folder: Path, ancestors: frozenset[Path]) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name in EXCLUDED_NAMES:
                continue
            path = folder / entry.name
            real = real_folder / entry.name
            if entry.is_symlink():
                real = Path(os.path.realpath(path))
                if not real.exists():
                    raise refuse(path, f"points to {os.readlink(path)!r}, which does not exist")
                if not any(_inside(real, a) for a in allowed):
                    raise refuse(path, f"points outside the model folder ({real})")
            if real.is_dir():
                if real in ancestors:
                    raise refuse(path, f"points to one of its own parent folders ({real}): a loop")
                walk(path, real, ancestors | {real})
            elif real.is_file():
                out.append(path.relative_to(root))

    walk(root, real_root, frozenset({real_root}))
    return sorted(out, key=lambda p: p.as_posix())


# --- hashing and digests -------------------------------------------------------------------------


def _hash_stream(fin: IO[bytes], on_bytes: Callable[[int], None] | None,
                 sink: Callable[[memoryview], object] | None = None) -> tuple[str, int]:
    """(sha256, size) of ``fin`` read in 8 MiB chunks (constant memory for multi-GB weights), each chunk
    also handed to ``sink`` (a copy's destination) and its length to ``on_bytes`` (progress)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while n := fin.readinto(buf):  # type: ignore[attr-defined]
        h.update(view[:n])
        if sink is not None:
            sink(view[:n])
        size += n
        if on_bytes is not None:
            on_bytes(n)
    return h.hexdigest(), size


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(sha256, size) of ``path``, read in chunks."""
    with open(path, "rb") as fh:
        return _hash_stream(fh, on_bytes)


def copy_hashing(src: Path, dest: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy ``src`` to the new file ``dest`` while hashing it (one read pass); fsync. Returns (sha256, size)."""
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        result = _hash_stream(fin, on_bytes, fout.write)
        fout.flush()
        os.fsync(fout.fileno())
    return result


def tree_digest_of_hashes(entries: Iterable[tuple[str, str]]) -> str:
    """Digest from ``(relative_posix_path, sha256)`` pairs (see the module docstring)."""
    h = hashlib.sha256()
    for rel, sha in sorted(entries):
        h.update(f"{sha}  {rel}\n".encode())
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """Digest of the model folder ``root``: every file :func:`list_model_files` lists, links followed."""
    root = Path(root)
    return tree_digest_of_hashes((rel.as_posix(), hash_file(root / rel)[0]) for rel in list_model_files(root))


#: The components whose files make a model's weights digest: what a LoRA adapter depends on.
ADAPTER_BASE_COMPONENTS = frozenset({"unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"})


def _is_card_or_doc(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1].lower()
    return rel == MODEL_CARD_FILE or name.endswith(".md") or name.startswith(("readme", "license"))


def _weight_paths(rels: Iterable[str]) -> set[str]:
    """Which of a model's relative paths count for its weights digest (see :func:`weights_digest`)."""
    rels = list(rels)
    keep = {rel for rel in rels if rel.split("/", 1)[0] in ADAPTER_BASE_COMPONENTS and not _is_card_or_doc(rel)}
    if not any(rel.startswith("unet/") for rel in keep):  # not a diffusers layout: all but the card and docs
        keep = {rel for rel in rels if not _is_card_or_doc(rel)}
    return keep


def weights_digest_of_hashes(entries: Iterable[tuple[str, str]]) -> str:
    """The weights digest from a model's ``(relative_posix_path, sha256)`` pairs (see :func:`weights_digest`)."""
    entries = list(entries)
    keep = _weight_paths(rel for rel, _ in entries)
    return tree_digest_of_hashes((rel, sha) for rel, sha in entries if rel in keep)


def weights_digest(root: Path) -> str:
    """Digest of what a LoRA adapter made for the model folder ``root`` depends on (hashing only those files).

    A LoRA adds low-rank deltas to UNet layers (the store refuses text-encoder layers), learned on the
    UNet's weights and on the text conditioning its cross-attention reads. So the digest covers the
    weight and config files of :data:`ADAPTER_BASE_COMPONENTS` (``unet/``, ``text_encoder/``,
    ``tokenizer/``), and nothing else: not the model card ``sdmaker.json`` (``sdmaker model tune`` rewrites
    it: recommended steps, guidance, dtype, none of which changes what an adapter learned), not READMEs
    or licences, not the scheduler config (a sampling choice), and not the VAE (an anchored VAE fine-tune
    keeps the latent space the UNet works in; a new latent space means a retrained UNet, which the digest
    sees). A folder without ``unet/`` (not a diffusers layout) falls back to every file but the card and
    docs. Same line format as :func:`tree_digest`.
    """
    root = Path(root)
    keep = _weight_paths(rel.as_posix() for rel in list_model_files(root))  # hash only those files
    return tree_digest_of_hashes((rel, hash_file(root / rel)[0]) for rel in sorted(keep))


def model_digests(root: Path) -> tuple[str, str]:
    """``(tree_digest(root), weights_digest(root))`` reading every file once."""
    root = Path(root)
    hashes = [(rel.as_posix(), hash_file(root / rel)[0]) for rel in list_model_files(root)]
    return tree_digest_of_hashes(hashes), weights_digest_of_hashes(hashes)


# --- atomic writes -------------------------------------------------------------------------------


def unique_tmp(directory: Path, stem: str = "") -> Path:
    """A fresh temp path in ``directory``: pid + random suffix, so concurrent writers never share one
    (file locks can silently succeed for every caller on NFS-like file systems)."""
    return Path(directory) / f".tmp-{stem}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists: for files that name their writer (pid files, a build's temp file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (``torch.save``, boto3).

    When the block ends without an error the temp file is fsynced and renamed onto ``path``; on an
    error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path.parent, path.name + "-")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` whose content appears at ``path`` all at once, when the block succeeds."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w', 'wt' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x"),
                                        encoding=encoding if "b" not in mode else None) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new content, never a torn file."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: Path, data: Any, *, indent: int | None = None) -> None:
    """:func:`atomic_write_bytes` of ``data`` as JSON (UTF-8)."""
    atomic_write_text(path, json.dumps(data, indent=indent))


#: errno values meaning "this file system has no hard links here" (FAT, some network and FUSE mounts).
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})


def write_once(names: Path | Iterable[Path], data: bytes, *, mode: int = 0o666) -> Path | None:
    """Write ``data`` under the first of ``names`` that does not exist yet; never replace a file.

    For results a user keeps (``generate``/``invoke`` images under numbered names) and for files whose
    first writer must win (the local key: two ``sdmaker up`` racing must not end with two keys). The
    bytes go to a temp file (created with ``mode``, less the umask; ``0o600`` keeps it private from the
    first byte), fsynced, then hard-linked under the name: the link fails if the name exists, so two
    concurrent writers never take the same one and a reader never sees a half-written file. Where the
    file system has no hard links, the name is reserved with an exclusive create and the temp file
    renamed onto it (a reader may then see the empty reservation for an instant).

    ``names`` are tried in order and must share one folder (created if missing); an endless generator
    of numbered names is fine. Returns the name written, or None when every name was taken.
    """
    candidates = iter([names] if isinstance(names, Path) else names)
    first = next(candidates, None)
    if first is None:
        return None
    folder = Path(first).parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(folder, Path(first).name + "-")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        links = True
        for path in itertools.chain([Path(first)], (Path(n) for n in candidates)):
            if links:
                try:
                    os.link(tmp, path)
                    fsync_dir(folder)
                    return path
                except FileExistsError:
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_LINK_ERRNOS:
                        raise
                    links = False
            try:  # no hard links: reserve the name, then rename the finished file onto the reservation
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode))
            except FileExistsError:
                continue
            os.replace(tmp, path)
            fsync_dir(folder)
            return path
        return None
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` at ``dest``; copy when the file system refuses links (other device, no support)."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


# --- folders -------------------------------------------------------------------------------------


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(staged: Path, dest: Path) -> None:
    """Put the complete folder ``staged`` at ``dest`` (same file system), replacing what was there.

    Two renames (the old folder aside, the new one in), so ``dest`` is missing for an instant but never
    half-written; if the second rename fails the old folder is put back. ``staged`` must not be inside
    ``dest``.
    """
    staged, dest = Path(staged), Path(dest)
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = unique_tmp(dest.parent, dest.name + "-old-")
        os.replace(dest, old)
    try:
        os.replace(staged, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        _remove_tree(old)


@contextlib.contextmanager
def staged_dir(dest: Path, *, mode: int = 0o755) -> Iterator[Path]:
    """Yield a fresh folder beside ``dest`` to build in; it replaces ``dest`` when the block succeeds.

    On an error the staged folder is removed and ``dest`` is untouched (see :func:`replace_dir`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        os.chmod(work, mode)  # mkdtemp makes it private; a model folder is ordinary data
        yield work
        replace_dir(work, dest)
    finally:
        if work.exists():
            _remove_tree(work)
