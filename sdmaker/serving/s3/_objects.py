"""The built-in S3's storage: buckets and objects on disk, durable across a kill -9.

Layout under ``root`` (``settings.s3_dir``)::

    index.sqlite3          buckets, objects (key -> blob, size, ETag, metadata), multipart uploads and parts
    blobs/<sha256>         object bytes, once per distinct content, read-only; copies share them
    uploads/<id>/<part>    the parts of multipart uploads in progress
    tmp/                   bytes being received (removed at start: a crash left them)

Object keys never become file names: an S3 key may be 1024 bytes of anything (``../x``, ``/abs``, NUL),
so keys live only in the index and bytes only under their digest. Nothing a client sends can name a path.

A write is: the bytes into ``tmp/`` (fsynced) -> renamed to ``blobs/<sha256>`` (or dropped when that blob
exists) -> one SQLite transaction that points the key at it (``synchronous=FULL``: committed means on
disk). A crash before the commit leaves an unreferenced blob, which :meth:`ObjectStore.open` sweeps; a
reader sees the old object or the new one, never a torn one.

Deduplication with the model store: a new blob whose digest is already a model-store blob
(``store/blobs/<sha256>``, the same content addressing) is a hard link to it, and the model store links
to ours the same way (:meth:`sdmaker.store.Store`), so a model uploaded here and then deployed is on disk
once. Blobs are never modified in place (mode 0444), which is what makes sharing inodes safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sdmaker.errors import S3ApiError
from sdmaker.files import fsync_dir, unique_tmp

__all__ = ["BlobWriter", "Listing", "ObjectInfo", "ObjectStore", "Part", "Upload"]

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
#: S3's limits: parts other than the last are at least 5 MiB; part numbers 1..10000.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PART_NUMBER = 10_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, created REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL, key TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, etag TEXT NOT NULL,
    modified REAL NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (bucket, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_sha ON objects (sha256);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, bucket TEXT NOT NULL, key TEXT NOT NULL, created REAL NOT NULL, meta TEXT NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS parts (
    upload TEXT NOT NULL, number INTEGER NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL, modified REAL NOT NULL,
    PRIMARY KEY (upload, number)) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. ``etag`` is S3's, unquoted: the MD5 hex, or ``<md5 of part md5s>-<parts>``."""

    bucket: str
    key: str
    sha256: str
    size: int
    etag: str
    modified: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int
    modified: float


@dataclass(frozen=True)
class Upload:
    id: str
    bucket: str
    key: str
    created: float
    meta: dict[str, Any]


@dataclass
class Listing:
    """A page of keys: ``contents`` and ``prefixes`` (common prefixes) in key order; ``last`` is the last
    key or prefix returned (the next page starts after it) when ``truncated``."""

    contents: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    last: str | None = None


class BlobWriter:
    """Receives an object's bytes into ``tmp/``, hashing them (sha256 for the blob, MD5 for the ETag)."""

    def __init__(self, tmp_dir: Path) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.path = unique_tmp(tmp_dir, "obj-")
        self._fh: IO[bytes] = open(self.path, "xb")  # noqa: SIM115 - closed in finish()/discard()
        self._sha = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self._md5.update(data)
        self.size += len(data)

    def sha256_so_far(self) -> str:
        return self._sha.hexdigest()

    def md5_so_far(self) -> str:
        return self._md5.hexdigest()

    def finish(self) -> tuple[str, str]:
        """Flush and fsync; returns ``(sha256, md5)`` hex digests."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._sha.hexdigest(), self._md5.hexdigest()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        self.path.unlink(missing_ok=True)


class ObjectStore:
    """Buckets and objects under ``root``; thread-safe (one SQLite connection behind a lock).

    ``peer_blobs`` are other content-addressed blob folders (the model store's) to hard-link from.
    """

    def __init__(self, root: Path, *, peer_blobs: Iterable[Path] = ()) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.uploads = self.root / "uploads"
        self.tmp = self.root / "tmp"
        self.peer_blobs = [Path(p) for p in peer_blobs]
        self._lock = threading.RLock()
        for folder in (self.blobs, self.uploads, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- transactions and blobs -------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _recover(self) -> None:
        """After a crash: drop partial writes, blobs no object points at, parts of forgotten uploads."""
        for entry in self.tmp.iterdir():
            _remove(entry)
        live = {row[0] for row in self._db.execute("SELECT DISTINCT sha256 FROM objects")}
        for blob in self.blobs.iterdir():
            if blob.name not in live:
                blob.unlink(missing_ok=True)
        uploads = {row[0] for row in self._db.execute("SELECT id FROM uploads")}
        for folder in self.uploads.iterdir():
            if folder.name not in uploads:
                _remove(folder)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def _place_blob(self, tmp: Path, sha256: str) -> None:
        """Make ``blobs/<sha256>`` hold ``tmp``'s bytes (call with the lock held); ``tmp`` is consumed."""
        blob = self.blob_path(sha256)
        if blob.exists():
            tmp.unlink(missing_ok=True)
            return
        for peer in self.peer_blobs:
            with contextlib.suppress(OSError):
                os.link(peer / sha256, blob)  # the model store holds these bytes already: share the inode
                tmp.unlink(missing_ok=True)
                fsync_dir(self.blobs)
                return
        os.chmod(tmp, 0o444)
        os.replace(tmp, blob)
        fsync_dir(self.blobs)

    def _release(self, db: sqlite3.Connection, sha256: str | None) -> None:
        """Unlink ``sha256``'s blob if no object uses it any more (lock held, inside the transaction)."""
        if sha256 and db.execute("SELECT 1 FROM objects WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is None:
            self.blob_path(sha256).unlink(missing_ok=True)

    def writer(self) -> BlobWriter:
        return BlobWriter(self.tmp)

    # --- buckets ----------------------------------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM buckets WHERE name = ?", (name,)).fetchone():
                raise S3ApiError("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                                 "succeeded and you already own it.", 409, bucket=name)
            db.execute("INSERT INTO buckets VALUES (?, ?)", (name, time.time()))

    def bucket_created(self, name: str) -> float:
        """The bucket's creation time; ``NoSuchBucket`` when it does not exist."""
        with self._lock:
            row = self._db.execute("SELECT created FROM buckets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise _no_bucket(name)
        return float(row[0])

    def list_buckets(self) -> list[tuple[str, float]]:
        with self._lock:
            return [(r[0], float(r[1])) for r in self._db.execute("SELECT name, created FROM buckets ORDER BY name")]

    def delete_bucket(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM buckets WHERE name = ?", (name,)).fetchone() is None:
                raise _no_bucket(name)
            if db.execute("SELECT 1 FROM objects WHERE bucket = ? LIMIT 1", (name,)).fetchone():
                raise S3ApiError("BucketNotEmpty", "The bucket you tried to delete is not empty", 409, bucket=name)
            uploads = [r[0] for r in db.execute("SELECT id FROM uploads WHERE bucket = ?", (name,))]
            for upload in uploads:
                db.execute("DELETE FROM parts WHERE upload = ?", (upload,))
            db.execute("DELETE FROM uploads WHERE bucket = ?", (name,))
            db.execute("DELETE FROM buckets WHERE name = ?", (name,))
        for upload in uploads:
            _remove(self.uploads / upload)

    def _need_bucket(self, db: sqlite3.Connection, name: str) -> None:
        if db.execute("SELECT 1 FROM buckets WHERE name = ?", (name,)).fetchone() is None:
            raise _no_bucket(name)

    # --- objects ----------------------------------------------------------------------------------

    def _row(self, db: sqlite3.Connection, bucket: str, key: str) -> ObjectInfo | None:
        row = db.execute("SELECT sha256, size, etag, modified, meta FROM objects WHERE bucket = ? AND key = ?",
                         (bucket, key)).fetchone()
        if row is None:
            return None
        return ObjectInfo(bucket, key, row[0], int(row[1]), row[2], float(row[3]), json.loads(row[4]))

    def head(self, bucket: str, key: str) -> ObjectInfo:
        with self._lock:
            self._need_bucket(self._db, bucket)
            info = self._row(self._db, bucket, key)
        if info is None:
            raise _no_key(bucket, key)
        return info

    def open(self, bucket: str, key: str) -> tuple[ObjectInfo, IO[bytes]]:
        """The object and an open handle on its bytes (opened under the lock: a concurrent delete or
        overwrite unlinks the blob, but this handle still reads the version it found)."""
        with self._lock:
            info = self.head(bucket, key)
            return info, open(self.blob_path(info.sha256), "rb")  # noqa: SIM115 - the caller closes it

    def _commit(self, bucket: str, key: str, tmp: Path, sha256: str, size: int, etag: str,
                meta: dict[str, Any], *, if_none_match: bool = False, if_match: str | None = None) -> ObjectInfo:
        """Point ``bucket/key`` at ``tmp``'s bytes (one transaction); ``tmp`` is consumed either way."""
        try:
            with self._tx() as db:
                self._need_bucket(db, bucket)
                old = self._row(db, bucket, key)
                if if_none_match and old is not None:
                    raise S3ApiError("PreconditionFailed", "At least one of the pre-conditions you specified did "
                                     "not hold", 412, bucket=bucket, key=key, condition="If-None-Match")
                if if_match is not None and (old is None or not _etag_matches(if_match, old.etag)):
                    if old is None:
                        raise _no_key(bucket, key)
                    raise S3ApiError("PreconditionFailed", "At least one of the pre-conditions you specified did "
                                     "not hold", 412, bucket=bucket, key=key, condition="If-Match")
                self._place_blob(tmp, sha256)
                now = time.time()
                db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (bucket, key, sha256, size, etag, now, json.dumps(meta)))
                if old is not None and old.sha256 != sha256:
                    self._release(db, old.sha256)
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(bucket, key, sha256, size, etag, now, meta)

    def put(self, bucket: str, key: str, writer: BlobWriter, meta: dict[str, Any], *, if_none_match: bool = False,
            if_match: str | None = None) -> ObjectInfo:
        """Store what ``writer`` received (finished here) as ``bucket/key``."""
        sha256, md5 = writer.finish()
        return self._commit(bucket, key, writer.path, sha256, writer.size, md5, meta, if_none_match=if_none_match,
                            if_match=if_match)

    def copy(self, src_bucket: str, src_key: str, bucket: str, key: str, meta: dict[str, Any] | None) -> ObjectInfo:
        """Server-side copy: a new key on the same blob (``meta`` None keeps the source's metadata)."""
        with self._tx() as db:
            self._need_bucket(db, bucket)
            self._need_bucket(db, src_bucket)
            src = self._row(db, src_bucket, src_key)
            if src is None:
                raise _no_key(src_bucket, src_key)
            old = self._row(db, bucket, key)
            now = time.time()
            new_meta = src.meta if meta is None else meta
            db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (bucket, key, src.sha256, src.size, src.etag, now, json.dumps(new_meta)))
            if old is not None and old.sha256 != src.sha256:
                self._release(db, old.sha256)
        return ObjectInfo(bucket, key, src.sha256, src.size, src.etag, now, new_meta)

    def delete(self, bucket: str, key: str) -> None:
        """Delete ``bucket/key``; deleting a missing key succeeds, as in S3."""
        with self._tx() as db:
            self._need_bucket(db, bucket)
            old = self._row(db, bucket, key)
            if old is not None:
                db.execute("DELETE FROM objects WHERE bucket = ? AND key = ?", (bucket, key))
                self._release(db, old.sha256)

    def list_keys(self, bucket: str, *, prefix: str = "", delimiter: str = "", after: str = "",
             max_keys: int = 1000) -> Listing:
        """Keys of ``bucket`` after ``after`` that start with ``prefix``, in UTF-8 byte order (S3's order;
        SQLite compares text bytewise), keys sharing ``prefix + ...delimiter`` rolled into one prefix."""
        out = Listing()
        cursor = max(after, prefix) if prefix > after else after
        inclusive = prefix > after
        with self._lock:
            self._need_bucket(self._db, bucket)
            while len(out.contents) + len(out.prefixes) < max_keys:
                rows = self._db.execute(
                    f"SELECT key, sha256, size, etag, modified, meta FROM objects WHERE bucket = ? AND key "
                    f"{'>=' if inclusive else '>'} ? ORDER BY key LIMIT 1000", (bucket, cursor)).fetchall()
                if not rows:
                    return out
                inclusive = False
                for key, sha, size, etag, modified, meta in rows:
                    cursor = key
                    if not key.startswith(prefix):
                        return out  # past the prefix: keys are sorted
                    if out.prefixes and out.last == out.prefixes[-1] and key.startswith(out.last):
                        continue  # inside the common prefix just returned
                    if _is_common_prefix(after, prefix, delimiter) and key.startswith(after):
                        continue  # inside the common prefix the previous page ended with
                    if len(out.contents) + len(out.prefixes) >= max_keys:
                        out.truncated = True
                        return out
                    cut = key.find(delimiter, len(prefix)) if delimiter else -1
                    if cut >= 0:
                        common = key[:cut + len(delimiter)]
                        out.prefixes.append(common)
                        out.last = common
                    else:
                        out.contents.append(ObjectInfo(bucket, key, sha, int(size), etag, float(modified),
                                                       json.loads(meta)))
                        out.last = key
            # the page is full: truncated only if another key (outside the last common prefix) follows
            out.truncated = self._more_after(bucket, prefix, delimiter, out.last or cursor)
        return out

    def _more_after(self, bucket: str, prefix: str, delimiter: str, last: str) -> bool:
        rows = self._db.execute("SELECT key FROM objects WHERE bucket = ? AND key > ? ORDER BY key",
                                (bucket, last))
        for (key,) in rows:
            if not key.startswith(prefix):
                return False
            if _is_common_prefix(last, prefix, delimiter) and key.startswith(last):
                continue
            return True
        return False

    # --- multipart uploads ------------------------------------------------------------------------

    def create_upload(self, bucket: str, key: str, meta: dict[str, Any]) -> str:
        upload = uuid.uuid4().hex
        with self._tx() as db:
            self._need_bucket(db, bucket)
            db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?)", (upload, bucket, key, time.time(),
                                                                      json.dumps(meta)))
        (self.uploads / upload).mkdir(parents=True, exist_ok=True)
        return upload

    def upload(self, bucket: str, key: str, upload_id: str) -> Upload:
        with self._lock:
            self._need_bucket(self._db, bucket)
            row = self._db.execute("SELECT bucket, key, created, meta FROM uploads WHERE id = ?",
                                   (upload_id,)).fetchone()
        if row is None or (row[0], row[1]) != (bucket, key):
            raise S3ApiError("NoSuchUpload", "The specified multipart upload does not exist. The upload ID may be "
                             "invalid, or the upload may have been aborted or completed.", 404,
                             bucket=bucket, key=key, upload_id=upload_id)
        return Upload(upload_id, row[0], row[1], float(row[2]), json.loads(row[3]))

    def put_part(self, bucket: str, key: str, upload_id: str, number: int, writer: BlobWriter) -> Part:
        """Keep what ``writer`` received as part ``number`` (replacing an earlier upload of that part)."""
        try:
            _, md5 = writer.finish()
            with self._tx() as db:
                self.upload(bucket, key, upload_id)
                part_path = self.uploads / upload_id / str(number)
                os.replace(writer.path, part_path)
                fsync_dir(part_path.parent)
                now = time.time()
                db.execute("INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?, ?)",
                           (upload_id, number, md5, writer.size, now))
        finally:
            writer.path.unlink(missing_ok=True)
        return Part(number, md5, writer.size, now)

    def parts(self, bucket: str, key: str, upload_id: str) -> list[Part]:
        with self._lock:
            self.upload(bucket, key, upload_id)
            rows = self._db.execute("SELECT number, md5, size, modified FROM parts WHERE upload = ? ORDER BY number",
                                    (upload_id,)).fetchall()
        return [Part(int(n), md5, int(size), float(m)) for n, md5, size, m in rows]

    def uploads_in(self, bucket: str, prefix: str = "") -> list[Upload]:
        with self._lock:
            self._need_bucket(self._db, bucket)
            rows = self._db.execute("SELECT id, key, created, meta FROM uploads WHERE bucket = ? ORDER BY key, created",
                                    (bucket,)).fetchall()
        return [Upload(r[0], bucket, r[1], float(r[2]), json.loads(r[3])) for r in rows if r[1].startswith(prefix)]

    def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        with self._tx() as db:
            self.upload(bucket, key, upload_id)
            db.execute("DELETE FROM parts WHERE upload = ?", (upload_id,))
            db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
        _remove(self.uploads / upload_id)

    def complete_upload(self, bucket: str, key: str, upload_id: str, wanted: list[tuple[int, str]], *,
                        if_none_match: bool = False) -> ObjectInfo:
        """Join the ``(part number, ETag)`` list (ascending, as uploaded) into ``bucket/key``.

        The ETag is S3's: MD5 of the concatenated binary part MD5s, ``-<count>``.
        """
        upload = self.upload(bucket, key, upload_id)
        have = {p.number: p for p in self.parts(bucket, key, upload_id)}
        if not wanted:
            raise S3ApiError("MalformedXML", "You must specify at least one part", 400)
        numbers = [n for n, _ in wanted]
        if numbers != sorted(set(numbers)):
            raise S3ApiError("InvalidPartOrder", "The list of parts was not in ascending order. Parts must be "
                             "ordered by part number.", 400, upload_id=upload_id)
        for i, (number, etag) in enumerate(wanted):
            part = have.get(number)
            if part is None or not _etag_matches(etag, part.etag):
                raise S3ApiError("InvalidPart", "One or more of the specified parts could not be found. The part "
                                 "may not have been uploaded, or the specified entity tag may not match the part's "
                                 "entity tag.", 400, upload_id=upload_id, part_number=number)
            if i < len(wanted) - 1 and part.size < MIN_PART_BYTES:
                raise S3ApiError("EntityTooSmall", "Your proposed upload is smaller than the minimum allowed "
                                 "size", 400, upload_id=upload_id, part_number=number, min_size_allowed=MIN_PART_BYTES)
        writer = self.writer()
        md5s = hashlib.md5(usedforsecurity=False)
        try:
            for number, _ in wanted:
                md5s.update(bytes.fromhex(have[number].etag))
                with open(self.uploads / upload_id / str(number), "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        writer.write(chunk)
            sha256, _ = writer.finish()
        except FileNotFoundError:  # aborted (or completed) by a concurrent request meanwhile
            writer.discard()
            raise S3ApiError("NoSuchUpload", "The specified multipart upload does not exist. It may have been "
                             "aborted or completed meanwhile.", 404, bucket=bucket, key=key,
                             upload_id=upload_id) from None
        except BaseException:
            writer.discard()
            raise
        etag = f"{md5s.hexdigest()}-{len(wanted)}"
        info = self._commit(bucket, key, writer.path, sha256, writer.size, etag, upload.meta,
                            if_none_match=if_none_match)
        with self._tx() as db:
            db.execute("DELETE FROM parts WHERE upload = ?", (upload_id,))
            db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
        _remove(self.uploads / upload_id)
        return info

    def copy_part(self, bucket: str, key: str, upload_id: str, number: int, src_bucket: str, src_key: str,
                  byte_range: tuple[int, int] | None) -> Part:
        """UploadPartCopy: part ``number`` from the bytes ``byte_range`` (inclusive) of another object."""
        info, fh = self.open(src_bucket, src_key)
        writer = self.writer()
        try:
            with fh:
                start, end = byte_range if byte_range is not None else (0, info.size - 1)
                fh.seek(start)
                left = end - start + 1
                while left > 0 and (chunk := fh.read(min(_CHUNK, left))):
                    writer.write(chunk)
                    left -= len(chunk)
        except BaseException:
            writer.discard()
            raise
        return self.put_part(bucket, key, upload_id, number, writer)


def _is_common_prefix(text: str, prefix: str, delimiter: str) -> bool:
    """Whether ``text`` is a common prefix of a listing (its first delimiter after ``prefix`` ends it), not a
    key: a folder-marker key equal to ``prefix`` also ends with the delimiter but is listed as a key."""
    if not delimiter or len(text) <= len(prefix) or not text.startswith(prefix):
        return False
    return text.find(delimiter, len(prefix)) == len(text) - len(delimiter)


def _etag_matches(given: str, etag: str) -> bool:
    """``If-Match``-style comparison: quotes optional, ``*`` matches anything, lists allowed."""
    return any(tag.strip().strip('"') in ("*", etag) for tag in given.split(","))


def _no_bucket(name: str) -> S3ApiError:
    return S3ApiError("NoSuchBucket", "The specified bucket does not exist", 404, bucket=name)


def _no_key(bucket: str, key: str) -> S3ApiError:
    return S3ApiError("NoSuchKey", "The specified key does not exist.", 404, bucket=bucket, key=key)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
