"""The built-in S3's on-disk store in-process: listing order and paging edge cases, blob sharing, recovery."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sdmaker.errors import S3ApiError
from sdmaker.serving.s3 import ObjectStore


def _put(store: ObjectStore, key: str, data: bytes = b"x", bucket: str = "b") -> None:
    writer = store.writer()
    writer.write(data)
    store.put(bucket, key, writer, {})


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    s = ObjectStore(tmp_path / "s3")
    s.create_bucket("b")
    return s


def _walk(store: ObjectStore, page: int, **kwargs: str) -> tuple[list[str], list[str]]:
    """All keys and common prefixes, fetched ``page`` at a time the way a paginator resumes."""
    keys: list[str] = []
    prefixes: list[str] = []
    after = ""
    while True:
        listing = store.list_keys("b", max_keys=page, after=after, **kwargs)
        keys += [o.key for o in listing.contents]
        prefixes += listing.prefixes
        if not listing.truncated:
            return keys, prefixes
        assert listing.last is not None
        after = listing.last


def test_listing_pages_never_lose_or_repeat_entries(store: ObjectStore) -> None:
    keys = ["a/1", "a/2", "a/b/3", "b", "c/", "c/x", "c/y/z", "d\u00e9", "d\U0001f600", "e"]
    for key in reversed(keys):
        _put(store, key)
    for page in (1, 2, 3, 100):
        assert _walk(store, page) == (keys, [])  # UTF-8 byte order, as S3
        assert _walk(store, page, delimiter="/") == (["b", "d\u00e9", "d\U0001f600", "e"], ["a/", "c/"])
        assert _walk(store, page, prefix="c/", delimiter="/") == (["c/", "c/x"], ["c/y/"])
        assert _walk(store, page, prefix="a/") == (["a/1", "a/2", "a/b/3"], [])
    assert store.list_keys("b", prefix="zzz").contents == []
    with pytest.raises(S3ApiError, match="bucket does not exist"):
        store.list_keys("nope")


def test_overwrite_delete_and_copy_share_and_release_blobs(store: ObjectStore) -> None:
    _put(store, "k", b"one")
    store.copy("b", "k", "b", "k2", None)
    _put(store, "k", b"two")
    one, two = hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()
    assert {p.name for p in store.blobs.iterdir()} == {one, two}  # k2 still holds "one"
    store.delete("b", "k2")
    assert {p.name for p in store.blobs.iterdir()} == {two}
    info, fh = store.open("b", "k")
    store.delete("b", "k")  # an open reader keeps the bytes it found
    with fh:
        assert fh.read() == b"two" and info.etag == hashlib.md5(b"two").hexdigest()
    assert list(store.blobs.iterdir()) == []


def test_peer_blobs_are_linked_and_leftovers_swept_on_open(tmp_path: Path) -> None:
    peer = tmp_path / "store-blobs"
    peer.mkdir()
    sha = hashlib.sha256(b"weights").hexdigest()
    (peer / sha).write_bytes(b"weights")
    store = ObjectStore(tmp_path / "s3", peer_blobs=[peer])
    store.create_bucket("b")
    _put(store, "w", b"weights")
    assert os.stat(store.blob_path(sha)).st_ino == os.stat(peer / sha).st_ino
    store.close()
    (tmp_path / "s3" / "blobs" / ("0" * 64)).write_bytes(b"orphan")  # a crash between blob and commit
    (tmp_path / "s3" / "tmp" / "partial").write_bytes(b"half")
    reopened = ObjectStore(tmp_path / "s3")
    assert {p.name for p in reopened.blobs.iterdir()} == {sha}
    assert list(reopened.tmp.iterdir()) == []
    assert reopened.head("b", "w").size == 7
