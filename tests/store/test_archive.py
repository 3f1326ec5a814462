"""safe_extract: a corpus of hostile archives (each refused with nothing written) and honest ones."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sdmaker.errors import ArchiveError
from sdmaker.store import archive_format, safe_extract
from sdmaker.store._archive import _copy_limited

Member = tuple[tarfile.TarInfo, bytes | None]


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    return info, None


def _dir(name: str, mode: int = 0o755) -> Member:
    return _special(name, tarfile.DIRTYPE, mode=mode)


def _tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _sparse_tar() -> bytes:
    """A GNU sparse member: 10 stored bytes claiming a 1 TiB real size."""
    info = tarfile.TarInfo("sparse.bin")
    info.size = 10
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[483:495] = b"%011o\x00" % (1 << 40)  # realsize
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + b"0123456789".ljust(512, b"\x00") + b"\x00" * 1024


def _zstd(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


BIG = 2 * 1024 * 1024
LIMIT = 1024 * 1024
SYM = tarfile.SYMTYPE

#: name -> (archive bytes factory, safe_extract kwargs, words the error must contain)
HOSTILE: dict[str, tuple[Callable[[], bytes], dict[str, int], str]] = {
    "dotdot": (lambda: _tar_bytes([_file("../evil.txt")]), {}, ".."),
    "nested-dotdot": (lambda: _tar_bytes([_file("unet/../../evil.txt")]), {}, ".."),
    "absolute": (lambda: _tar_bytes([_file("/tmp/sdmaker-evil.txt")]), {}, "absolute"),
    "windows-drive": (lambda: _tar_bytes([_file("C:/evil.txt")]), {}, "absolute"),
    "backslash-traversal": (lambda: _tar_bytes([_file("..\\..\\evil.txt")]), {}, "backslash"),
    "symlink-out-absolute": (lambda: _tar_bytes([_special("etc", SYM, "/etc")]), {}, "symlink"),
    "symlink-out-relative": (lambda: _tar_bytes([_special("up", SYM, "../../outside")]), {}, "symlink"),
    "symlink-inside": (lambda: _tar_bytes([_file("a.json"), _special("b.json", SYM, "a.json")]), {}, "symlink"),
    "symlink-then-write-through": (lambda: _tar_bytes([_special("d", SYM, "/tmp"), _file("d/evil.txt")]), {},
                                   "symlink"),
    "symlink-chain-cve-2025-4517": (lambda: _tar_bytes(
        [_dir("a"), _special("a/b", SYM, "."), _special("a/b/c", SYM, "../.."), _special("esc", SYM, "a/b/c/.."),
         _file("esc/evil.txt")]), {}, "symlink"),
    "empty-name-symlink": (lambda: _tar_bytes([_special("", SYM, "/etc")]), {}, "empty"),
    "hardlink-out": (lambda: _tar_bytes([_special("passwd", tarfile.LNKTYPE, "/etc/passwd")]), {}, "hard link"),
    "hardlink-inside": (lambda: _tar_bytes([_file("a.json"), _special("b.json", tarfile.LNKTYPE, "a.json")]), {},
                        "hard link"),
    "char-device": (lambda: _tar_bytes([_special("null", tarfile.CHRTYPE)]), {}, "device"),
    "block-device": (lambda: _tar_bytes([_special("sda", tarfile.BLKTYPE)]), {}, "device"),
    "fifo": (lambda: _tar_bytes([_special("pipe", tarfile.FIFOTYPE)]), {}, "FIFO"),
    "sparse": (_sparse_tar, {}, "sparse"),
    "setuid": (lambda: _tar_bytes([_file("run.sh", b"#!/bin/sh\n", mode=0o4755)]), {}, "setuid"),
    "setgid": (lambda: _tar_bytes([_file("run.sh", b"#!/bin/sh\n", mode=0o2755)]), {}, "setuid"),
    "sticky-dir": (lambda: _tar_bytes([_dir("tmp", mode=0o1777)]), {}, "sticky"),
    "declared-size-bomb": (lambda: _tar_bytes([_file("big.bin", bytes(BIG))]), {"max_total_bytes": LIMIT},
                           "exceeds"),
    "gzip-size-bomb": (lambda: gzip.compress(_tar_bytes([_file("zeros.bin", bytes(BIG))])),
                       {"max_total_bytes": LIMIT}, "exceeds"),
    "gzip-bomb-4x-limit": (lambda: gzip.compress(_tar_bytes([_file("zeros.bin", bytes(4 * BIG))])),
                                          {"max_total_bytes": LIMIT, "max_members": 10}, "exceeds"),
    "zstd-bomb-4x-limit": (lambda: _zstd(_tar_bytes([_file("zeros.bin", bytes(4 * BIG))])),
                                          {"max_total_bytes": LIMIT, "max_members": 10}, "exceeds"),
    "many-small-over-budget": (lambda: _tar_bytes([_file(f"f{i}", bytes(300_000)) for i in range(4)]),
                               {"max_total_bytes": LIMIT}, "exceeds"),
    "too-many-members": (lambda: _tar_bytes([_file(f"f{i}") for i in range(11)]), {"max_members": 10},
                         "more than 10"),
    "duplicate-file": (lambda: _tar_bytes([_file("model_index.json", b"{}"), _file("model_index.json", b"evil")]),
                       {}, "duplicate"),
    "duplicate-via-dot": (lambda: _tar_bytes([_file("a/b.json"), _file("./a/./b.json")]), {}, "duplicate"),
    "file-then-child": (lambda: _tar_bytes([_file("unet"), _file("unet/config.json")]), {}, "parent"),
    "dir-then-file-same-name": (lambda: _tar_bytes([_dir("unet"), _file("unet")]), {}, "duplicate"),
    "dot-as-file": (lambda: _tar_bytes([_file("./")]), {}, "without a name"),
    "long-component": (lambda: _tar_bytes([_file("unet/" + "a" * 300 + ".json")]), {}, "name too long"),
    "long-component-gzip": (lambda: gzip.compress(_tar_bytes([_dir("d" * 300), _file("d" * 300 + "/x")])), {},
                            "name too long"),
    "long-component-multibyte": (lambda: _tar_bytes([_file("é" * 200)]), {}, "name too long"),  # 400 bytes
    "too-deep": (lambda: _tar_bytes([_file("/".join(["d"] * 40) + "/f")]), {}, "deeper"),
    "not-an-archive": (lambda: b"this is not a tar file at all" * 40, {}, "not a readable"),
    "truncated-gzip": (lambda: gzip.compress(_tar_bytes([_file("a.bin", os.urandom(50_000))]))[:20_000], {},
                       "not a readable"),
}


def _assert_untouched(workdir: Path, before: set[str], dest: Path) -> None:
    assert not dest.exists(), "dest must not exist after a refused archive"
    assert {p.name for p in workdir.iterdir()} == before, "no temp dir or file may be left next to dest"
    assert not Path("/tmp/sdmaker-evil.txt").exists()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_written(case: str, tmp_path: Path) -> None:
    factory, kwargs, words = HOSTILE[case]
    archive = tmp_path / f"{case}.tar"
    archive.write_bytes(factory())
    outside = tmp_path / "outside"  # sentinel a traversal would land next to
    before = {p.name for p in tmp_path.iterdir()}
    dest = tmp_path / "out" / "model"
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError) as info:
        safe_extract(archive, dest, **kwargs)
    assert words.lower() in info.value.message.lower(), info.value.message
    assert "nothing was extracted" in info.value.message or words == "not a readable"
    assert info.value.code == "ArchiveError"
    _assert_untouched(tmp_path / "out", set(), dest)
    assert {p.name for p in tmp_path.iterdir()} == before | {"out"}
    assert not outside.exists() and not (tmp_path / "evil.txt").exists()


def test_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 20


def test_hostile_member_named_in_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar_bytes([_file("ok.json"), _file("../../evil.txt")]))
    with pytest.raises(ArchiveError) as info:
        safe_extract(archive, tmp_path / "dest")
    assert info.value.fields["member"] == "../../evil.txt"
    assert "'../../evil.txt'" in info.value.message


@pytest.mark.parametrize("compress", ["tar", "gz", "zst"])
def test_hostile_member_after_good_ones_refused_in_every_format(compress: str, tmp_path: Path) -> None:
    raw = _tar_bytes([_file("model_index.json", b"{}"), _file("unet/w.bin", os.urandom(10_000)),
                      _special("unet/link", SYM, "/etc/passwd")])
    if compress == "gz":
        raw = gzip.compress(raw)
    elif compress == "zst":
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    archive = tmp_path / "model.tar"
    archive.write_bytes(raw)
    with pytest.raises(ArchiveError, match="symlink"):
        safe_extract(archive, tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tar"]


def test_byte_counter_refuses_more_data_than_declared(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(ArchiveError, match="more data than declared"):
        _copy_limited(io.BytesIO(b"x" * 100), fd, declared=10, budget=1000, name="f", archive=tmp_path / "a.tar")


def test_byte_counter_refuses_over_budget(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(ArchiveError):
        _copy_limited(io.BytesIO(b"x" * 100), fd, declared=100, budget=50, name="f", archive=tmp_path / "a.tar")


def test_dest_must_be_absent_or_empty(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar_bytes([_file("a.json")]))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="not an empty folder"):
        safe_extract(archive, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [p.name for p in safe_extract(archive, empty)] == ["a.json"]


def test_gnu_tar_archive_with_dot_slash_names_extracts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "w.safetensors").write_bytes(os.urandom(70_000))
    archive = tmp_path / "m.tar.gz"
    subprocess.run(["tar", "-C", str(src), "-czf", str(archive), "."], check=True)
    out = safe_extract(archive, tmp_path / "dest")
    assert sorted(p.relative_to(tmp_path / "dest").as_posix() for p in out) == ["model_index.json",
                                                                               "unet/w.safetensors"]
    assert (tmp_path / "dest" / "unet" / "w.safetensors").read_bytes() == (src / "unet" / "w.safetensors").read_bytes()
    assert oct((tmp_path / "dest" / "model_index.json").stat().st_mode & 0o7777) == "0o644"


def test_multi_member_gzip_reads_every_member(tmp_path: Path) -> None:
    """Concatenated gzip members (pigz -i, cat a.gz b.gz) are valid; all of them must be read."""
    raw = _tar_bytes([_file("a.json", b"{}"), _file("b.bin", os.urandom(40_000)), _file("c.json", b"[]")])
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(gzip.compress(raw[:1024]) + gzip.compress(raw[1024:]))
    assert archive_format(archive) == "gzip"
    out = safe_extract(archive, tmp_path / "dest")
    assert sorted(p.name for p in out) == ["a.json", "b.bin", "c.json"]


def test_progress_reports_bytes(tmp_path: Path) -> None:
    archive = tmp_path / "m.tar"
    archive.write_bytes(_tar_bytes([_file("a.bin", bytes(1000)), _file("b.bin", bytes(500))]))
    seen: list[tuple[int, int]] = []
    safe_extract(archive, tmp_path / "dest", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (1500, 1500)


def test_gzip_with_trailing_zero_padding_and_zstd_frames(tmp_path: Path) -> None:
    raw = _tar_bytes([_file("a.json", b"{}"), _file("b.bin", os.urandom(30_000))])
    gz = tmp_path / "padded.tar.gz"
    gz.write_bytes(gzip.compress(raw) + b"\x00" * 4096)  # tape-style padding, accepted by GNU gzip
    assert sorted(p.name for p in safe_extract(gz, tmp_path / "g")) == ["a.json", "b.bin"]
    zst = tmp_path / "frames.tar.zst"
    zst.write_bytes(_zstd(raw[:2048]) + _zstd(raw[2048:]))  # two zstd frames
    assert sorted(p.name for p in safe_extract(zst, tmp_path / "z")) == ["a.json", "b.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp plain tar removed
