"""What enters the store is verified: safetensors headers (issue 12 item 5) and archive member names (item 6)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sdmaker.errors import ArchiveError, ModelFormatError
from sdmaker.store import Store
from sdmaker.store._safetensors import check_safetensors

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _raw(header: object, data: bytes = b"", *, n: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if n is None else n) + blob + data


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


#: name -> (file bytes, words the error must contain)
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "header-length-2^63": (lambda: _raw({}, n=2**63), "over the"),
    "header-length-past-end": (lambda: _raw({"a": _t("U8", [4], 0, 4)}, b"1234", n=10_000), "past the end"),
    "shorter-than-8-bytes": (lambda: b"\x01\x00\x00", "shorter than the 8-byte"),
    "header-not-json": (lambda: _raw(b"{not json at all}"), "not valid JSON"),
    "header-not-utf8": (lambda: _raw(b"{\"\xff\xfe\": 1}"), "not valid JSON"),
    "header-is-a-list": (lambda: _raw([1, 2]), "not a JSON object"),
    "duplicate-tensor-name": (lambda: _raw(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                                           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"12"),
                              "appears twice"),
    "unknown-dtype": (lambda: _raw({"a": _t("F128", [1], 0, 16)}, bytes(16)), "unknown dtype"),
    "negative-shape": (lambda: _raw({"a": _t("U8", [-4], 0, 4)}, bytes(4)), "shape"),
    "shape-disagrees-with-offsets": (lambda: _raw({"a": _t("F32", [2, 3], 0, 16)}, bytes(16)), "needs 24 bytes"),
    "offsets-reversed": (lambda: _raw({"a": _t("U8", [0], 8, 4)}, bytes(8)), "end before they begin"),
    "offsets-past-data": (lambda: _raw({"a": _t("U8", [64], 0, 64)}, bytes(8)), "run past"),
    "offsets-not-ints": (lambda: _raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": ["0", 1]}}, b"1"),
                         "data_offsets"),
    "overlapping-tensors": (lambda: _raw({"a": _t("U8", [8], 0, 8), "b": _t("U8", [8], 4, 12)}, bytes(12)),
                            "overlap"),
    "gap-between-tensors": (lambda: _raw({"a": _t("U8", [4], 0, 4), "b": _t("U8", [4], 8, 12)}, bytes(12)), "gap"),
    "trailing-bytes": (lambda: _raw({"a": _t("U8", [4], 0, 4)}, bytes(4096)), "cover 4 bytes"),
    "metadata-not-strings": (lambda: _raw({"__metadata__": {"k": 1}, "a": _t("U8", [1], 0, 1)}, b"1"), "__metadata__"),
    "pickle-renamed": (lambda: b"\x80\x04\x95" + struct.pack("<Q", 40) + b"ccopy_reg\n_reconstructor\n" + b"." * 20,
                       "pickle"),
    "torch-zip-renamed": (lambda: b"PK\x03\x04" + bytes(60) + b"archive/data.pkl", "torch.save"),
}


def _valid_files(tmp_path: Path) -> list[Path]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a = tmp_path / "a.safetensors"
    save_file({"w": rng.standard_normal((3, 5)).astype(np.float16), "b": np.arange(7, dtype=np.int64),
               "empty": np.zeros((0, 4), dtype=np.float32), "flag": np.array([True, False])}, str(a),
              metadata={"format": "pt"})
    b = tmp_path / "b.safetensors"
    save_file({}, str(b))
    return [a, b]


def test_real_safetensors_files_pass(tmp_path: Path) -> None:
    mini = Path(__file__).resolve().parents[2] / "sdmaker" / "models" / "mini"
    files = _valid_files(tmp_path) + sorted(mini.rglob("*.safetensors"))
    for path in files:
        check_safetensors(path)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_is_refused(case: str, tmp_path: Path) -> None:
    factory, words = HOSTILE[case]
    path = tmp_path / "w.safetensors"
    path.write_bytes(factory())
    with pytest.raises(ModelFormatError) as info:
        check_safetensors(path, name="unet/w.safetensors")
    assert words.lower() in info.value.message.lower(), info.value.message
    assert info.value.message.startswith("unet/w.safetensors is not a valid safetensors file")


@pytest.mark.parametrize("case", ["header-length-2^63", "overlapping-tensors", "pickle-renamed"])
def test_store_refuses_bad_safetensors_from_folders_and_archives(case: str, tmp_path: Path, make_fake_model  # type: ignore[no-untyped-def]
                                                                  ) -> None:
    src = make_fake_model(tmp_path / "m", extra={WEIGHTS: HOSTILE[case][0]()})
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, path.relative_to(src).as_posix(), recursive=False)
    store = Store(tmp_path / "store")
    for source in (src, archive):
        with pytest.raises(ModelFormatError, match="not a valid safetensors file") as info:
            store.import_model(source, name="m")
        assert WEIGHTS in info.value.message and str(source.resolve()) in info.value.message
    assert store.list() == []  # nothing half-written: no manifest, no blob, no snapshot, no staging left
    for sub in ("blobs", "snapshots", "manifests", "tmp", "staging"):
        assert not ((store.root / sub).exists() and any((store.root / sub).iterdir())), sub


def test_store_checks_the_bytes_it_stores(tmp_path: Path, make_fake_model,  # type: ignore[no-untyped-def]
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A file swapped after the up-front check (a race with the folder's owner) is still refused."""
    from sdmaker.files import copy_hashing
    from sdmaker.store import _store as store_module

    src = make_fake_model(tmp_path / "m")

    def swap_then_copy(s: Path, d: Path, cb):  # type: ignore[no-untyped-def]
        if s.name.endswith(".safetensors"):
            s.write_bytes(HOSTILE["gap-between-tensors"][0]())
        return copy_hashing(s, d, cb)

    monkeypatch.setattr(store_module, "copy_hashing", swap_then_copy)
    store = Store(tmp_path / "store")
    with pytest.raises(ModelFormatError, match="gap"):
        store.import_model(src, name="m")
    assert store.list() == [] and not any(store.blobs.iterdir()) and not any(store.tmp.iterdir())


def test_store_refuses_an_over_long_member_name_clearly(tmp_path: Path, make_fake_model) -> None:  # type: ignore[no-untyped-def]
    src = make_fake_model(tmp_path / "m")
    archive = tmp_path / "m.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, path.relative_to(src).as_posix(), recursive=False)
        info = tarfile.TarInfo("unet/" + "x" * 300 + ".json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    archive.write_bytes(buf.getvalue())
    store = Store(tmp_path / "store")
    with pytest.raises(ArchiveError) as err:
        store.import_model(archive, name="m")
    message = err.value.message
    assert "name too long" in message and "255" in message, message
    assert "not a readable" not in message and "Errno" not in message, message
    assert store.list() == [] and not any(store.staging.iterdir())
