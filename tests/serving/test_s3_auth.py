"""S3 request signatures verified in-process against what botocore's S3 signers produce (no daemon)."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sdmaker.config import Settings
from sdmaker.errors import AuthenticationError
from sdmaker.serving.daemon._auth import verify_request

SETTINGS = Settings(home=Path("/nonexistent"), auth_access_key_id="AKIDS3", auth_secret_access_key="s3-secret")
BASE = "http://127.0.0.1:8765"


def _headers(request: AWSRequest) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {"host": ["127.0.0.1:8765"]}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), []).append(value if isinstance(value, str) else value.decode())
    return headers


def _signed_put(path: str, body: bytes, secret: str = "s3-secret") -> dict:  # type: ignore[type-arg]
    request = AWSRequest(method="PUT", url=BASE + path, data=body,
                         headers={"X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()})
    S3SigV4Auth(Credentials("AKIDS3", secret), "s3", "us-east-1").add_auth(request)
    headers = _headers(request)
    headers["content-length"] = [str(len(body))]
    return {"method": "PUT", "path": path, "query": "", "headers": headers, "body": None}


def test_s3_paths_are_signed_as_sent_and_uploads_verify_before_the_body() -> None:
    path = "/s3/bucket/dir/a%20b%2Bc%25d/%C3%BC.txt"  # S3 signs this as is (no second encoding)
    assert verify_request(SETTINGS, **_signed_put(path, b"payload")) == "sigv4:AKIDS3"
    with pytest.raises(AuthenticationError, match="signature does not match"):
        verify_request(SETTINGS, **_signed_put(path, b"payload", secret="wrong"))
    req = _signed_put(path, b"payload")
    with pytest.raises(AuthenticationError, match="signature does not match"):
        verify_request(SETTINGS, **{**req, "path": "/s3/bucket/other"})
    no_digest = {k: v for k, v in req["headers"].items() if k != "x-amz-content-sha256"}
    with pytest.raises(AuthenticationError, match="X-Amz-Content-SHA256"):
        verify_request(SETTINGS, **{**req, "headers": no_digest})
    unsigned = {**req["headers"], "x-amz-content-sha256": ["UNSIGNED-PAYLOAD"]}
    with pytest.raises(AuthenticationError, match="UNSIGNED-PAYLOAD"):
        verify_request(SETTINGS, **{**req, "headers": unsigned})


def _presigned(path: str, expires: int = 300, method: str = "GET") -> dict:  # type: ignore[type-arg]
    request = AWSRequest(method=method, url=BASE + path)
    S3SigV4QueryAuth(Credentials("AKIDS3", "s3-secret"), "s3", "us-east-1", expires=expires).add_auth(request)
    url = urlsplit(request.url)
    return {"method": method, "path": url.path, "query": url.query, "headers": {"host": ["127.0.0.1:8765"]},
            "body": b""}


def test_presigned_sigv4_urls_verify_until_they_expire() -> None:
    req = _presigned("/s3/bucket/key%20x")
    assert verify_request(SETTINGS, **req) == "sigv4:AKIDS3"
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=400)
    with pytest.raises(AuthenticationError, match="expired"):
        verify_request(SETTINGS, **req, now=later)
    with pytest.raises(AuthenticationError, match="signature does not match"):
        verify_request(SETTINGS, **{**req, "query": req["query"].replace("X-Amz-Expires=300", "X-Amz-Expires=600")})
    with pytest.raises(AuthenticationError, match="GET and HEAD only"):
        verify_request(SETTINGS, **_presigned("/s3/bucket/key", method="PUT"))
    with pytest.raises(AuthenticationError, match="X-Amz-Expires"):
        verify_request(SETTINGS, **_presigned("/s3/bucket/key", expires=8 * 24 * 3600))
