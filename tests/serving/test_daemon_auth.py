"""SigV4 / bearer verification in-process, against requests signed by botocore itself; bind policy; profiles."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sdmaker.config import Settings
from sdmaker.errors import AuthenticationError, ConfigError
from sdmaker.serving.daemon._auth import auth_required, check_bind, verify_request
from sdmaker.serving.daemon._variant import instance_profile

SETTINGS = Settings(home=Path("/nonexistent"), auth_access_key_id="AKIDTEST", auth_secret_access_key="secret-1",
                    auth_token="tok")


def _signed(body: bytes = b'{"prompt": "a cat"}', *, key: str = "AKIDTEST", secret: str = "secret-1",
            path: str = "/endpoints/demo/invocations", query: str = "") -> dict:
    url = f"http://127.0.0.1:8765{path}" + (f"?{query}" if query else "")
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json",
                                                                      "Accept": "application/json"})
    SigV4Auth(Credentials(key, secret), "sagemaker", "us-east-1").add_auth(request)
    headers: dict[str, list[str]] = {"host": ["127.0.0.1:8765"]}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), []).append(value if isinstance(value, str) else value.decode())
    return {"method": "POST", "path": path, "query": query, "headers": headers, "body": body}


def test_botocore_signature_verifies() -> None:
    assert verify_request(SETTINGS, **_signed()) == "sigv4:AKIDTEST"
    assert verify_request(SETTINGS, **_signed(query="b=2&a=1")) == "sigv4:AKIDTEST"


@pytest.mark.parametrize(("change", "message"), [
    ({"secret": "wrong"}, "signature does not match"),
    ({"key": "OTHER"}, "unknown access key"),
])
def test_wrong_credentials_are_refused(change: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(AuthenticationError, match=message):
        verify_request(SETTINGS, **_signed(**change))


def test_tampered_body_path_and_replay_are_refused() -> None:
    req = _signed()
    with pytest.raises(AuthenticationError, match="signature does not match"):  # the body is signed
        verify_request(SETTINGS, **{**req, "body": b'{"prompt": "a dog"}'})
    declared = {**req["headers"], "x-amz-content-sha256": ["0" * 64]}
    with pytest.raises(AuthenticationError, match="does not match the body"):
        verify_request(SETTINGS, **{**req, "headers": declared})
    with pytest.raises(AuthenticationError, match="signature does not match"):
        verify_request(SETTINGS, **{**req, "path": "/endpoints/other/invocations"})
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=16)
    with pytest.raises(AuthenticationError, match="15 minutes"):
        verify_request(SETTINGS, **req, now=later)


def test_bearer_and_missing_credentials() -> None:
    base = {"method": "GET", "path": "/metrics", "query": "", "body": b""}
    assert verify_request(SETTINGS, headers={"authorization": ["Bearer tok"]}, **base) == "bearer"
    with pytest.raises(AuthenticationError, match="invalid bearer token"):
        verify_request(SETTINGS, headers={"authorization": ["Bearer nope"]}, **base)
    with pytest.raises(AuthenticationError, match="missing credentials"):
        verify_request(SETTINGS, headers={}, **base)


def test_bind_policy() -> None:
    bare = Settings(home=Path("/nonexistent"))
    assert not auth_required(bare, "127.0.0.1") and not auth_required(bare, "::1")
    assert auth_required(bare, "0.0.0.0") and auth_required(bare, "192.168.1.5")
    check_bind(bare, "127.0.0.1")
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0 without credentials"):
        check_bind(bare, "0.0.0.0")
    check_bind(SETTINGS, "0.0.0.0")
    token_only = Settings(home=Path("/nonexistent"), auth_token="t")
    check_bind(token_only, "10.0.0.1")
    with pytest.raises(ConfigError):
        check_bind(Settings(home=Path("/nonexistent"), require_auth=True), "127.0.0.1")


def test_instance_type_profiles() -> None:
    assert instance_profile("ml.m5.xlarge") == ("cpu", None)
    assert instance_profile("local") == ("cpu", None)
    device, warning = instance_profile("ml.g4dn.xlarge")
    assert device == "auto"
    has_gpu = any(Path("/dev").glob("nvidia[0-9]*"))
    assert (warning is None) == has_gpu
