"""Authentication of daemon requests: AWS SigV4 (what boto3 and the SageMaker SDK send) or a bearer token.

On 127.0.0.1 nothing is checked (clients sign with dummy keys, as they must for botocore). On any other
bind address, or with ``SDMAKER_REQUIRE_AUTH=1``, every request needs either

* ``Authorization: AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/<service>/aws4_request, SignedHeaders=...,
  Signature=...`` made with the daemon's ``SDMAKER_ACCESS_KEY_ID`` / ``SDMAKER_SECRET_ACCESS_KEY``
  (so users point ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` at those), or
* ``Authorization: Bearer <SDMAKER_API_TOKEN>``.

The signature is recomputed here from the request as received, following the SigV4 specification
(https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html) the way
botocore builds it (``botocore/auth.py`` ``SigV4Auth``: path quoted again with ``safe='/~'``, query
pairs sorted as sent, header values whitespace-collapsed). Requests more than 15 minutes off the
daemon's clock are refused, as AWS does, to bound replays.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from urllib.parse import quote

from sdmaker.config import Settings
from sdmaker.errors import AuthenticationError, ConfigError
from sdmaker.serving._http import is_loopback

__all__ = ["auth_required", "check_bind", "is_loopback", "verify_request"]

logger = logging.getLogger(__name__)

_SIGV4 = re.compile(r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),\s*"
                    r"Signature=(?P<sig>[0-9a-fA-F]+)")
_MAX_SKEW = dt.timedelta(minutes=15)
_UNSIGNED = ("UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")


def auth_required(settings: Settings, host: str | None = None) -> bool:
    return settings.require_auth or not is_loopback(host or settings.daemon_host)


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to start on a non-loopback address (or with ``require_auth``) without credentials."""
    if not auth_required(settings, host):
        return
    has_sigv4 = bool(settings.auth_access_key_id and settings.auth_secret_access_key)
    if not (has_sigv4 or settings.auth_token):
        raise ConfigError(
            f"refusing to listen on {host} without credentials: set SDMAKER_ACCESS_KEY_ID and "
            "SDMAKER_SECRET_ACCESS_KEY (SigV4, for boto3/SageMaker SDK clients) and/or SDMAKER_API_TOKEN "
            "(bearer token), or bind 127.0.0.1", field="host", value=host)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def _canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = [pair.partition("=")[::2] for pair in query.split("&")]
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _signature(secret: str, *, method: str, path: str, query: str, headers: Mapping[str, list[str]],
               signed: list[str], payload_hash: str, amz_date: str, scope: str) -> str:
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in headers.get(name, []))}\n" for name in signed)
    canonical_request = "\n".join([method.upper(), quote(path or "/", safe="/~"), _canonical_query(query),
                                   canonical_headers, ";".join(signed), payload_hash])
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                                hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])
    date, region, service, terminator = scope.split("/")
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    for part in (region, service, terminator):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_request(settings: Settings, *, method: str, path: str, query: str,
                   headers: Mapping[str, list[str]], body: bytes, now: dt.datetime | None = None) -> str:
    """Check one request's credentials; return who it is (``sigv4:<key>`` or ``bearer``).

    ``headers`` maps lower-case names to all their values. Raises :class:`AuthenticationError` (HTTP 403).
    """
    auth = (headers.get("authorization") or [""])[0].strip()
    if auth.lower().startswith("bearer "):
        token = auth[7:].strip()
        if settings.auth_token and hmac.compare_digest(token.encode(), settings.auth_token.encode()):
            return "bearer"
        raise AuthenticationError("invalid bearer token")
    match = _SIGV4.match(auth)
    if not match:
        raise AuthenticationError("missing credentials: sign the request with SigV4 (AWS credentials) or send "
                                  "'Authorization: Bearer <token>'")
    if not (settings.auth_access_key_id and settings.auth_secret_access_key):
        raise AuthenticationError("this daemon accepts no SigV4 credentials (no SDMAKER_ACCESS_KEY_ID configured)")
    key_id, _, scope = match["cred"].partition("/")
    if not hmac.compare_digest(key_id.encode(), settings.auth_access_key_id.encode()):
        raise AuthenticationError(f"unknown access key {key_id!r}")
    if scope.count("/") != 3 or not scope.endswith("/aws4_request"):
        raise AuthenticationError("malformed SigV4 credential scope")
    amz_date = (headers.get("x-amz-date") or [""])[0]
    try:
        when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise AuthenticationError("missing or malformed X-Amz-Date header") from None
    if not scope.startswith(amz_date[:8]):
        raise AuthenticationError("credential scope date does not match X-Amz-Date")
    now = now or dt.datetime.now(dt.timezone.utc)
    if abs(now - when) > _MAX_SKEW:
        raise AuthenticationError("request time is more than 15 minutes away from the daemon's clock")
    signed = match["signed"].lower().split(";")
    if "host" not in signed:
        raise AuthenticationError("SigV4 SignedHeaders must include host")
    body_hash = hashlib.sha256(body).hexdigest()
    declared = (headers.get("x-amz-content-sha256") or [""])[0]
    if declared in _UNSIGNED and body:
        # the signature would not cover the body: a captured request could be replayed with another payload
        # (botocore signs the payload of these APIs, always over http: nothing legitimate sends this)
        raise AuthenticationError("X-Amz-Content-SHA256: UNSIGNED-PAYLOAD is refused for requests with a body; "
                                  "sign the payload (SigV4 with the body's SHA-256)")
    if declared and declared not in _UNSIGNED and declared != body_hash:
        raise AuthenticationError("X-Amz-Content-SHA256 does not match the body")
    expected = _signature(settings.auth_secret_access_key, method=method, path=path, query=query, headers=headers,
                          signed=signed, payload_hash=declared or body_hash, amz_date=amz_date, scope=scope)
    if not hmac.compare_digest(expected, match["sig"].lower()):
        raise AuthenticationError("SigV4 signature does not match (check the secret access key and endpoint URL)")
    return f"sigv4:{key_id}"
