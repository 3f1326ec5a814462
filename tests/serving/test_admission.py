"""Issue 11's bounded resources and backpressure: input images bounded before decoding, the admission
estimate, the memory budget and the load spread of the dispatcher."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sdmaker.errors import InvalidRequestError
from sdmaker.serving import HandlerService, ModelServer, create_app
from sdmaker.serving.container._codecs import MAX_INPUT_PIXELS, decode


def _huge_png(width: int = 17000, height: int = 10000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels: a few KB on the wire."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    pixels = zlib.compress(row * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_a_huge_png_is_refused_from_its_header() -> None:
    png = _huge_png()
    assert len(png) < 200_000
    with pytest.raises(InvalidRequestError) as info:
        decode(png, "image/png")
    assert "170000000" in info.value.message and str(MAX_INPUT_PIXELS) in info.value.message


def test_a_huge_png_gets_400_from_the_worker_and_a_small_one_still_decodes(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "inference.py").write_text(
        "def model_fn(model_dir):\n    return None\n\n"
        "def predict_fn(data, model):\n    return {'size': list(data['inputs'].size)}\n")
    server = ModelServer(HandlerService(tmp_path, device="cpu"))
    assert server.load()
    client = TestClient(create_app(server), base_url="http://127.0.0.1:8080")
    reply = client.post("/invocations", content=_huge_png(), headers={"Content-Type": "image/png"})
    assert reply.status_code == 400
    assert str(MAX_INPUT_PIXELS) in reply.text
    small = client.post("/invocations", content=_huge_png(64, 32), headers={"Content-Type": "image/png"})
    assert small.status_code == 200 and small.json() == {"size": [64, 32]}


def test_an_image_just_over_the_limit_is_refused_by_its_size_before_decoding() -> None:
    with pytest.raises(InvalidRequestError) as info:  # under PIL's own 2x bomb guard: our header check
        decode(_huge_png(5000, 4000), "image/png")
    assert "5000x4000" in info.value.message and str(MAX_INPUT_PIXELS) in info.value.message
