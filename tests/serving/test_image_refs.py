"""Image references (``s3://``, URLs) in asynchronous and batch transform requests: the daemon-side fetcher.

No daemon here: S3 is a stand-in client (the real path runs in test_async_image_refs.py), URLs a local
``http.server`` on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdmaker.config import Settings
from sdmaker.errors import InvalidRequestError, S3Error
from sdmaker.schema import decode_input_image
from sdmaker.serving.daemon._image_refs import (
    ImageFetcher,
    image_bytes_limit,
    references_in,
    resolve_payload,
    resolve_record,
)


def _png(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._data.read(n)

    def close(self) -> None:
        pass


class FakeS3:
    """``get_object`` as botocore answers it: the objects given, else NoSuchKey (or the error given)."""

    def __init__(self, objects: dict[str, bytes], error: Exception | None = None) -> None:
        self.objects, self.error, self.calls = objects, error, 0

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        from botocore.exceptions import ClientError

        self.calls += 1
        if self.error is not None:
            raise self.error
        data = self.objects.get(f"{Bucket}/{Key}")
        if data is None:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "The specified key does not exist."}},
                              "GetObject")
        return {"Body": _Body(data), "ContentLength": len(data), "ContentType": "image/png"}


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(home=tmp_path, **kw)


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, headers, body = self.routes.get(self.path, (404, {}, b"no"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    _Handler.routes = {
        "/red.png": (200, {"Content-Type": "image/png"}, PNG),
        "/text": (200, {"Content-Type": "text/plain"}, b"not an image at all"),
        "/big.png": (200, {}, PNG + b"\0" * 4096),
        "/hop": (302, {"Location": "/red.png"}, b""),
        "/away": (302, {"Location": f"http://localhost:{port}/red.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    server.server_close()


def test_a_reference_outside_async_and_transform_is_a_400_naming_the_field() -> None:
    for field, ref in (("image", "s3://bucket/in.png"), ("mask_image", "HTTPS://example.com/m.png")):
        with pytest.raises(InvalidRequestError) as err:
            decode_input_image(ref, field)
        assert err.value.fields["field"] == field
        assert "InvokeEndpointAsync" in err.value.message and "transform" in err.value.message


def test_references_are_found_at_the_top_level_and_in_parameters() -> None:
    payload = {"inputs": "x", "image": "s3://b/a.png", "parameters": {"mask_image": "https://h/m.png"}}
    assert [(f, r) for _h, f, r in references_in(payload)] == [("image", "s3://b/a.png"),
                                                                  ("mask_image", "https://h/m.png")]
    assert references_in({"prompt": "x", "image": base64.b64encode(PNG).decode()}) == []
    assert references_in(["not", "a", "dict"]) == []


def test_s3_reference_is_fetched_into_base64_with_the_same_digest(tmp_path: Path) -> None:
    s3 = FakeS3({"bucket/in/red.png": PNG})
    fetcher = ImageFetcher(_settings(tmp_path), lambda: s3)
    payload: dict[str, Any] = {"prompt": "x", "image": "s3://bucket/in/red.png"}
    done = resolve_payload(payload, fetcher)
    assert done == [{"field": "image", "reference": "s3://bucket/in/red.png", "bytes": str(len(PNG))}]
    assert base64.b64decode(payload["image"]) == PNG
    # the recipe's digest is of the decoded bytes: the fetched image's own
    assert hashlib.sha256(decode_input_image(payload["image"])).hexdigest() == hashlib.sha256(PNG).hexdigest()


def test_s3_failures_name_the_field(tmp_path: Path) -> None:
    from botocore.exceptions import EndpointConnectionError

    fetcher = ImageFetcher(_settings(tmp_path), lambda: FakeS3({"b/text": b"hello", "b/big.png": PNG}))
    with pytest.raises(InvalidRequestError) as err:
        fetcher.fetch("mask_image", "s3://b/missing.png")
    assert err.value.fields["field"] == "mask_image" and "no such object" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        fetcher.fetch("image", "s3://b/text")
    assert err.value.fields["field"] == "image" and "not a PNG, JPEG or WebP" in err.value.message
    small = ImageFetcher(_settings(tmp_path, max_body_bytes=len(PNG)), lambda: FakeS3({"b/big.png": PNG}))
    assert image_bytes_limit(small.settings) < len(PNG)
    with pytest.raises(InvalidRequestError) as err:
        small.fetch("image", "s3://b/big.png")
    assert "larger than" in err.value.message and "SDMAKER_MAX_BODY_BYTES" in err.value.message
    # the S3 service or the network: stays an S3Error, for the caller to try again later
    down = ImageFetcher(_settings(tmp_path), lambda: FakeS3({}, EndpointConnectionError(endpoint_url="http://x")))
    with pytest.raises(S3Error) as s3err:
        down.fetch("image", "s3://b/a.png")
    assert not isinstance(s3err.value, InvalidRequestError)


def test_urls_are_refused_unless_the_operator_allows_their_host(tmp_path: Path, http_port: int) -> None:
    url = f"http://127.0.0.1:{http_port}/red.png"
    with pytest.raises(InvalidRequestError) as err:
        ImageFetcher(_settings(tmp_path), lambda: None).fetch("image", url)
    assert err.value.fields["field"] == "image" and "SDMAKER_IMAGE_URL_HOSTS" in err.value.message
    other = ImageFetcher(_settings(tmp_path, image_url_hosts=("example.com",)), lambda: None)
    with pytest.raises(InvalidRequestError) as err:
        other.fetch("mask_image", url)
    assert err.value.fields["field"] == "mask_image" and "SDMAKER_IMAGE_URL_HOSTS" in err.value.message
    wrong_port = ImageFetcher(_settings(tmp_path, image_url_hosts=(f"127.0.0.1:{http_port + 1}",)), lambda: None)
    with pytest.raises(InvalidRequestError, match="not in SDMAKER_IMAGE_URL_HOSTS"):
        wrong_port.fetch("image", url)


def test_allowed_urls_are_fetched_and_checked(tmp_path: Path, http_port: int) -> None:
    base = f"http://127.0.0.1:{http_port}"
    fetcher = ImageFetcher(_settings(tmp_path, image_url_hosts=(f"127.0.0.1:{http_port}",)), lambda: None)
    assert fetcher.fetch("image", f"{base}/red.png") == PNG
    assert fetcher.fetch("image", f"{base}/hop") == PNG  # a redirect to the same allowed host
    assert ImageFetcher(_settings(tmp_path, image_url_hosts=("127.0.0.1",)), lambda: None).fetch(
        "image", f"{base}/red.png") == PNG  # a bare host allows any port
    with pytest.raises(InvalidRequestError, match="not in SDMAKER_IMAGE_URL_HOSTS"):
        fetcher.fetch("image", f"{base}/away")  # redirected to a host that is not allowed
    with pytest.raises(InvalidRequestError, match="redirected more than"):
        fetcher.fetch("image", f"{base}/loop")
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        fetcher.fetch("image", f"{base}/nothing")
    with pytest.raises(InvalidRequestError, match="not a PNG, JPEG or WebP"):
        fetcher.fetch("image", f"{base}/text")
    small = ImageFetcher(_settings(tmp_path, image_url_hosts=("127.0.0.1",), max_body_bytes=len(PNG) * 4 // 3 + 8),
                         lambda: None)
    assert small.fetch("image", f"{base}/red.png") == PNG
    with pytest.raises(InvalidRequestError, match="larger than"):
        small.fetch("image", f"{base}/big.png")
    with pytest.raises(InvalidRequestError) as err:  # credentials in a URL never show in an error
        fetcher.fetch("image", f"http://user:secret@127.0.0.1:{http_port}/nothing")
    assert "secret" not in err.value.message


def test_a_request_too_large_with_its_images_in_is_refused(tmp_path: Path) -> None:
    limit = len(PNG) * 4 // 3 + 100  # one image fits a request, two do not
    fetcher = ImageFetcher(_settings(tmp_path, max_body_bytes=limit), lambda: FakeS3({"b/a.png": PNG}))
    with pytest.raises(InvalidRequestError) as err:
        resolve_payload({"prompt": "x", "image": "s3://b/a.png", "mask_image": "s3://b/a.png"}, fetcher)
    assert "SDMAKER_MAX_BODY_BYTES" in err.value.message and err.value.fields["field"] in ("image", "mask_image")


def test_transform_records_get_their_references_fetched(tmp_path: Path) -> None:
    s3 = FakeS3({"b/a.png": PNG})
    fetcher = ImageFetcher(_settings(tmp_path), lambda: s3)
    plain = b'{"prompt": "x", "seed": 1}'
    assert resolve_record(plain, "application/json", fetcher) is plain and s3.calls == 0
    one = json.loads(resolve_record(b'{"prompt": "x", "image": "s3://b/a.png"}', "application/json", fetcher))
    assert base64.b64decode(one["image"]) == PNG
    lines = resolve_record(b'{"prompt": "x", "image": "s3://b/a.png"}\n{"prompt": "y"}\n', "application/jsonlines",
                           fetcher).split(b"\n")
    assert len(lines) == 2 and base64.b64decode(json.loads(lines[0])["image"]) == PNG
    assert json.loads(lines[1]) == {"prompt": "y"}
    csv = b"inputs\ns3://b/a.png\n"
    assert resolve_record(csv, "text/csv", fetcher) is csv  # not JSON: the worker answers for it
    with pytest.raises(InvalidRequestError, match="no such object"):
        resolve_record(b'{"prompt": "x", "mask_image": "s3://b/gone.png"}', None, fetcher)
