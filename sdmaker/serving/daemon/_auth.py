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

S3 (credential scope service ``s3``, the built-in S3 under ``/s3``) differs the way botocore's
``S3SigV4Auth`` does: the path is signed as sent (no second encoding). A request may also carry its signature
in the query string (a presigned URL: ``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``,
``X-Amz-Expires``, ``X-Amz-SignedHeaders``, ``X-Amz-Signature``); that is accepted for GET and HEAD only,
within ``X-Amz-Expires`` (at most 7 days) of its date. boto3's ``generate_presigned_url`` for S3 signs with
SigV2 query parameters (``AWSAccessKeyId``, ``Expires``, ``Signature``: HMAC-SHA1 over method, expiry and
resource, botocore ``HmacV1QueryAuth``) unless told ``signature_version="s3v4"``; those are accepted for
GET and HEAD as well, expiring at most 7 days ahead. An S3 upload is verified before its body is read
(``body=None``): the signature covers the declared ``X-Amz-Content-SHA256``, which the S3 server then
compares with the bytes it received.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from urllib.parse import quote, unquote

from sdmaker.config import S3_PATH_PREFIX, Settings
from sdmaker.errors import AuthenticationError, ConfigError
from sdmaker.serving._http import is_loopback

__all__ = ["auth_required", "check_bind", "is_loopback", "verify_request"]

logger = logging.getLogger(__name__)

_SIGV4 = re.compile(r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),\s*"
                    r"Signature=(?P<sig>[0-9a-fA-F]+)")
_MAX_SKEW = dt.timedelta(minutes=15)
_UNSIGNED = ("UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
_MAX_PRESIGN_S = 7 * 24 * 3600


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


def _canonical_query(query: str, *, drop: str = "") -> str:
    if not query:
        return ""
    pairs = [pair.partition("=")[::2] for pair in query.split("&")]
    return "&".join(f"{k}={v}" for k, v in sorted(pairs) if k != drop)


def _signature(secret: str, *, method: str, path: str, query: str, headers: Mapping[str, list[str]],
               signed: list[str], payload_hash: str, amz_date: str, scope: str) -> str:
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in headers.get(name, []))}\n" for name in signed)
    date, region, service, terminator = scope.split("/")
    # S3 signs the path as sent; every other service the path URI-encoded once more (botocore S3SigV4Auth)
    canonical_path = (path or "/") if service == "s3" else quote(path or "/", safe="/~")
    canonical_request = "\n".join([method.upper(), canonical_path, _canonical_query(query, drop="X-Amz-Signature"),
                                   canonical_headers, ";".join(signed), payload_hash])
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                                hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    for part in (region, service, terminator):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _query_params(query: str) -> dict[str, str]:
    return {unquote(k): unquote(v) for k, _, v in (pair.partition("=") for pair in query.split("&") if pair)}


def _check_key_and_date(settings: Settings, cred: str, amz_date: str, now: dt.datetime | None, *,
                        expires_s: int | None = None) -> tuple[str, str]:
    """The access key and credential scope of ``cred``, checked against the daemon's key and clock."""
    if not (settings.auth_access_key_id and settings.auth_secret_access_key):
        raise AuthenticationError("this daemon accepts no SigV4 credentials (no SDMAKER_ACCESS_KEY_ID configured)")
    key_id, _, scope = cred.partition("/")
    if not hmac.compare_digest(key_id.encode(), settings.auth_access_key_id.encode()):
        raise AuthenticationError(f"unknown access key {key_id!r}")
    if scope.count("/") != 3 or not scope.endswith("/aws4_request"):
        raise AuthenticationError("malformed SigV4 credential scope")
    try:
        when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise AuthenticationError("missing or malformed X-Amz-Date") from None
    if not scope.startswith(amz_date[:8]):
        raise AuthenticationError("credential scope date does not match X-Amz-Date")
    now = now or dt.datetime.now(dt.timezone.utc)
    if expires_s is None:
        if abs(now - when) > _MAX_SKEW:
            raise AuthenticationError("request time is more than 15 minutes away from the daemon's clock")
    elif when - now > _MAX_SKEW or now > when + dt.timedelta(seconds=expires_s):
        raise AuthenticationError("the presigned URL has expired (or is dated in the future)")
    return key_id, scope


def _verify_presigned(settings: Settings, *, method: str, path: str, query: str,
                      headers: Mapping[str, list[str]], now: dt.datetime | None) -> str:
    """Query-string SigV4 (a presigned URL): GET/HEAD only, within its ``X-Amz-Expires``."""
    params = _query_params(query)
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise AuthenticationError("unsupported X-Amz-Algorithm (only AWS4-HMAC-SHA256)")
    if method.upper() not in ("GET", "HEAD"):
        raise AuthenticationError("presigned URLs are accepted for GET and HEAD only; sign other requests with "
                                  "the Authorization header")
    try:
        expires_s = int(params.get("X-Amz-Expires", ""))
    except ValueError:
        raise AuthenticationError("missing or malformed X-Amz-Expires") from None
    if not 1 <= expires_s <= _MAX_PRESIGN_S:
        raise AuthenticationError(f"X-Amz-Expires must be 1..{_MAX_PRESIGN_S} seconds")
    amz_date = params.get("X-Amz-Date", "")
    key_id, scope = _check_key_and_date(settings, params.get("X-Amz-Credential", ""), amz_date, now,
                                        expires_s=expires_s)
    signed = params.get("X-Amz-SignedHeaders", "").lower().split(";")
    if "host" not in signed:
        raise AuthenticationError("SigV4 SignedHeaders must include host")
    expected = _signature(settings.auth_secret_access_key or "", method=method, path=path, query=query,
                          headers=headers, signed=signed, payload_hash="UNSIGNED-PAYLOAD", amz_date=amz_date,
                          scope=scope)
    if not hmac.compare_digest(expected, params.get("X-Amz-Signature", "").lower()):
        raise AuthenticationError("SigV4 signature does not match (check the secret access key and endpoint URL)")
    return f"sigv4:{key_id}"


#: Query parameters that SigV2 signs as part of the resource (botocore ``HmacV1Auth.QSAOfInterest``, the GET ones).
_V2_SUBRESOURCES = frozenset({"acl", "location", "partNumber", "versionId", "versions", "uploadId", "uploads",
                              "tagging", "response-content-type", "response-content-language", "response-expires",
                              "response-cache-control", "response-content-disposition",
                              "response-content-encoding"})


def _verify_presigned_v2(settings: Settings, *, method: str, path: str, query: str,
                         now: dt.datetime | None) -> str:
    """A SigV2 presigned S3 URL (what boto3 makes by default for S3): GET/HEAD only, not yet expired."""
    params = _query_params(query)
    if method.upper() not in ("GET", "HEAD"):
        raise AuthenticationError("presigned URLs are accepted for GET and HEAD only; sign other requests with "
                                  "the Authorization header")
    if not (settings.auth_access_key_id and settings.auth_secret_access_key):
        raise AuthenticationError("this daemon accepts no SigV4 credentials (no SDMAKER_ACCESS_KEY_ID configured)")
    key_id = params.get("AWSAccessKeyId", "")
    if not hmac.compare_digest(key_id.encode(), settings.auth_access_key_id.encode()):
        raise AuthenticationError(f"unknown access key {key_id!r}")
    try:
        expires = int(params.get("Expires", ""))
    except ValueError:
        raise AuthenticationError("missing or malformed Expires") from None
    now_s = (now or dt.datetime.now(dt.timezone.utc)).timestamp()
    if now_s > expires or expires - now_s > _MAX_PRESIGN_S:
        raise AuthenticationError("the presigned URL has expired (or expires more than 7 days ahead)")
    sub = sorted((k, unquote(v)) for k, _, v in (p.partition("=") for p in query.split("&"))
                 if k in _V2_SUBRESOURCES)
    suffix = ("?" + "&".join(f"{k}={v}" if v else k for k, v in sub)) if sub else ""
    given = params.get("Signature", "").encode()
    # botocore signs the bucket/key path (its ``auth_path``), without an endpoint URL's own path: accept both
    for resource in {path, path[len(S3_PATH_PREFIX):] if path.startswith(S3_PATH_PREFIX + "/") else path}:
        string_to_sign = f"{method.upper()}\n\n\n{expires}\n{resource}{suffix}"
        digest = hmac.new(settings.auth_secret_access_key.encode(), string_to_sign.encode(), hashlib.sha1).digest()
        if hmac.compare_digest(base64.b64encode(digest), given):
            return f"sigv2:{key_id}"
    raise AuthenticationError("presigned URL signature does not match (check the secret access key and endpoint "
                              "URL)")


def verify_request(settings: Settings, *, method: str, path: str, query: str,
                   headers: Mapping[str, list[str]], body: bytes | None, now: dt.datetime | None = None) -> str:
    """Check one request's credentials; return who it is (``sigv4:<key>`` or ``bearer``).

    ``headers`` maps lower-case names to all their values. ``body`` None: not read yet (an S3 upload
    streamed to disk); the request must then declare ``X-Amz-Content-SHA256``, which the caller compares
    with the body's digest once received. Raises :class:`AuthenticationError` (HTTP 403).
    """
    if "X-Amz-Signature=" in query and "X-Amz-Algorithm=" in query:
        return _verify_presigned(settings, method=method, path=path, query=query, headers=headers, now=now)
    if "Signature=" in query and "AWSAccessKeyId=" in query:
        return _verify_presigned_v2(settings, method=method, path=path, query=query, now=now)
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
    amz_date = (headers.get("x-amz-date") or [""])[0]
    key_id, scope = _check_key_and_date(settings, match["cred"], amz_date, now)
    signed = match["signed"].lower().split(";")
    if "host" not in signed:
        raise AuthenticationError("SigV4 SignedHeaders must include host")
    declared = (headers.get("x-amz-content-sha256") or [""])[0]
    if body is None:
        if not declared:
            raise AuthenticationError("S3 requests must carry X-Amz-Content-SHA256 (the payload's SHA-256)")
        has_body = ((headers.get("content-length") or ["0"])[0].strip() not in ("", "0")
                    or "transfer-encoding" in headers)
        body_hash = declared
    else:
        has_body = bool(body)
        body_hash = hashlib.sha256(body).hexdigest()
    if declared in _UNSIGNED and has_body:
        # the signature would not cover the body: a captured request could be replayed with another payload
        # (botocore signs the payload of these APIs, always over http: nothing legitimate sends this)
        raise AuthenticationError("X-Amz-Content-SHA256: UNSIGNED-PAYLOAD is refused for requests with a body; "
                                  "sign the payload (SigV4 with the body's SHA-256)")
    if declared and declared not in _UNSIGNED and declared != body_hash:
        raise AuthenticationError("X-Amz-Content-SHA256 does not match the body")
    expected = _signature(settings.auth_secret_access_key or "", method=method, path=path, query=query, headers=headers,
                          signed=signed, payload_hash=declared or body_hash, amz_date=amz_date, scope=scope)
    if not hmac.compare_digest(expected, match["sig"].lower()):
        raise AuthenticationError("SigV4 signature does not match (check the secret access key and endpoint URL)")
    return f"sigv4:{key_id}"
