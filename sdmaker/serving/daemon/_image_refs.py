"""Image references in asynchronous and batch transform requests: ``image``/``mask_image`` as ``s3://`` or a URL.

An asynchronous request's body is at most 128,000 bytes inline, too small for most images, and a batch transform
record naming its image beats one carrying it. So on those two paths (never on ``InvokeEndpoint``: a synchronous
request is answered while its caller waits, and its worker never makes network calls on a caller's behalf) the
daemon fetches a referenced image **before** the request reaches a worker and puts its bytes in the request as
base64: the worker's contract is unchanged, and the recipe's ``inputs`` digests are those of the fetched bytes,
as for an inline image.

* ``s3://bucket/key`` is read with the client the daemon reads asynchronous inputs with
  (:func:`sdmaker.store._s3.client_for`: the user's S3 when configured, else the built-in one).
* ``http(s)://`` URLs are a server-side request forgery surface (the daemon would fetch whatever a caller names,
  cloud metadata and loopback services included), so they are refused unless the operator lists the host in
  ``SDMAKER_IMAGE_URL_HOSTS``. Redirects are followed by hand, each hop checked against the same list; no
  proxy from the environment is used.

Limits: an image may have at most :func:`image_bytes_limit` bytes, the most a base64 image fits in a request
(``SDMAKER_MAX_BODY_BYTES`` x 3/4, since base64 takes 4 bytes per 3): the download stops there. The request with its
images in must still fit a worker's ``SDMAKER_MAX_BODY_BYTES``; the pixel limits are the schema's, checked when
the request is validated. A URL's download has ``SDMAKER_IMAGE_URL_TIMEOUT`` seconds, redirects included.

Every failure is an :class:`InvalidRequestError` naming the field, except S3 errors worth another try later
(the service or the network), which stay :class:`S3Error` for the caller to retry.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import InvalidRequestError, S3Error, utf8_safe
from sdmaker.schema import image_reference_scheme, input_image_info

__all__ = ["IMAGE_FIELDS", "MAX_REDIRECTS", "S3_TRANSIENT", "ImageFetcher", "image_bytes_limit",
           "references_in", "resolve_payload", "resolve_record"]

#: The request fields that may hold an image reference.
IMAGE_FIELDS: tuple[str, ...] = ("image", "mask_image")
#: Redirects one URL may take (each to an allowed host).
MAX_REDIRECTS = 3
#: S3 error codes worth another try later (the service or the network), as :mod:`sdmaker.store._s3` reports them.
S3_TRANSIENT = frozenset({"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                          "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                          "RequestTimeout"})


def image_bytes_limit(settings: Settings) -> int:
    """The most bytes one referenced image may have: what a base64 image fits in a ``max_body_bytes`` request."""
    return max(1, settings.max_body_bytes * 3 // 4)


def references_in(payload: Any) -> list[tuple[dict[str, Any], str, str]]:
    """``(holder, field, reference)`` of each image reference in a decoded request (top level or the Hugging Face
    toolkit's ``parameters``), in field order."""
    if not isinstance(payload, dict):
        return []
    holders = [payload]
    params = payload.get("parameters")
    if isinstance(params, dict):
        holders.append(params)
    out = []
    for holder in holders:
        for name in IMAGE_FIELDS:
            value = holder.get(name)
            if isinstance(value, str) and image_reference_scheme(value) is not None:
                out.append((holder, name, value.strip()))
    return out


class ImageFetcher:
    """Fetches referenced images for the daemon (called in threads: the built-in S3 answers on the event loop).

    Args:
        settings: the daemon's (limits, ``SDMAKER_IMAGE_URL_HOSTS``, the URL timeout).
        s3_client: the S3 client asynchronous inputs are read with (built lazily by the caller).
    """

    def __init__(self, settings: Settings, s3_client: Callable[[], Any]) -> None:
        self.settings = settings
        self._s3_client = s3_client

    @property
    def limit(self) -> int:
        return image_bytes_limit(self.settings)

    def fetch(self, field: str, reference: str) -> bytes:
        """The bytes of the image ``reference`` names, checked to be a PNG/JPEG/WebP within the limits.

        Raises:
            InvalidRequestError: naming ``field``: refused, missing, too large, not an image, unreachable.
            S3Error: an S3 failure worth retrying later (:data:`S3_TRANSIENT`).
        """
        scheme = image_reference_scheme(reference)
        data = self._s3(field, reference) if scheme == "s3" else self._url(field, reference)
        try:
            input_image_info(base64.b64encode(data).decode("ascii"), field)
        except InvalidRequestError as exc:  # "image is not a PNG...: send ... base64": said of the fetched bytes
            what = exc.message.split(": send the file's bytes", 1)[0]
            what = what[len(field):] if what.startswith(field) else f": {what}"
            raise InvalidRequestError(f"{field} fetched from {_shown(reference)}{what}", field=field,
                                      value=_shown(reference), allowed=exc.fields.get("allowed")) from None
        return data

    def _s3(self, field: str, reference: str) -> bytes:
        from sdmaker.store._s3 import get_bytes

        try:
            data, _type = get_bytes(reference, limit=self.limit, client=self._s3_client())
        except S3Error as exc:
            code = exc.fields.get("aws_code")
            if code in S3_TRANSIENT:
                raise
            if code == "EntityTooLarge":
                raise self._too_large(field, reference) from None
            raise InvalidRequestError(f"{field}: cannot read {_shown(reference)}: {exc.message}", field=field,
                                      value=_shown(reference)) from None
        return data

    def _too_large(self, field: str, reference: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"{field}: {_shown(reference)} is larger than {self.limit} bytes, the most an input image may have "
            "(3/4 of SDMAKER_MAX_BODY_BYTES, what fits a request base64-encoded)", field=field,
            value=_shown(reference), allowed=f"at most {self.limit} bytes")

    def _check_host(self, field: str, url: Any) -> None:
        """Refuse a URL whose scheme is not http(s) or whose host is not in ``SDMAKER_IMAGE_URL_HOSTS``."""
        hosts = self.settings.image_url_hosts
        shown = _shown(str(url))
        if not hosts:
            raise InvalidRequestError(
                f"{field} is a URL ({shown}), and this daemon fetches no image URLs: its operator allows hosts with "
                "SDMAKER_IMAGE_URL_HOSTS (comma separated). Give the image as an s3:// reference or base64",
                field=field, value=shown, allowed="s3:// or base64 (SDMAKER_IMAGE_URL_HOSTS is empty)")
        if url.scheme not in ("http", "https"):
            raise InvalidRequestError(f"{field}: {shown} is not an http(s) URL", field=field, value=shown)
        host = (url.host or "").lower().strip("[]")
        port = url.port or (443 if url.scheme == "https" else 80)
        allowed = {h.lower().strip() for h in hosts}
        if host not in allowed and f"{host}:{port}" not in allowed and f"[{host}]:{port}" not in allowed:
            raise InvalidRequestError(
                f"{field}: the host of {shown} ({host}:{port}) is not in SDMAKER_IMAGE_URL_HOSTS "
                f"({', '.join(hosts)}): the daemon fetches image URLs from those hosts only", field=field,
                value=shown, allowed=", ".join(hosts))

    def _url(self, field: str, reference: str) -> bytes:
        """GET the URL (by hand through redirects, each hop checked), streamed, stopping at the byte limit."""
        import httpx

        try:
            url = httpx.URL(reference)
        except (httpx.InvalidURL, ValueError) as exc:
            raise InvalidRequestError(f"{field}: {_shown(reference)} is not a valid URL: {exc}", field=field,
                                      value=_shown(reference)) from None
        timeout_s = self.settings.image_url_timeout_s
        deadline = time.monotonic() + timeout_s
        headers = {"Accept": "image/png, image/jpeg, image/webp", "Accept-Encoding": "identity"}
        try:
            with httpx.Client(follow_redirects=False, trust_env=False, timeout=timeout_s) as client:
                for _hop in range(MAX_REDIRECTS + 1):
                    self._check_host(field, url)
                    with client.stream("GET", url, headers=headers) as reply:
                        if reply.is_redirect and "location" in reply.headers:
                            url = url.join(reply.headers["location"])
                            continue
                        if reply.status_code != 200:
                            raise InvalidRequestError(f"{field}: GET {_shown(str(url))} answered HTTP "
                                                      f"{reply.status_code}", field=field, value=_shown(reference))
                        declared = reply.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > self.limit:
                            raise self._too_large(field, reference)
                        data = bytearray()
                        for chunk in reply.iter_raw():
                            data += chunk
                            if len(data) > self.limit:
                                raise self._too_large(field, reference)
                            if time.monotonic() > deadline:
                                raise httpx.ReadTimeout("the download took too long")
                        return bytes(data)
        except httpx.TimeoutException:
            raise InvalidRequestError(f"{field}: fetching {_shown(reference)} took longer than {timeout_s:g} s "
                                      "(SDMAKER_IMAGE_URL_TIMEOUT)", field=field, value=_shown(reference)) from None
        except httpx.HTTPError as exc:
            raise InvalidRequestError(f"{field}: cannot fetch {_shown(reference)}: {type(exc).__name__}: {exc}",
                                      field=field, value=_shown(reference)) from None
        raise InvalidRequestError(f"{field}: {_shown(reference)} redirected more than {MAX_REDIRECTS} times",
                                  field=field, value=_shown(reference))


def resolve_payload(payload: Any, fetcher: ImageFetcher) -> list[dict[str, str]]:
    """Replace each image reference in a decoded request by its fetched bytes, base64 (in place).

    Returns ``{"field", "reference", "bytes"}`` per reference fetched. A request whose fetched images make it
    larger than a worker takes (``SDMAKER_MAX_BODY_BYTES``) is refused naming its largest image's field.
    """
    found = references_in(payload)
    done: list[dict[str, str]] = []
    sizes: dict[str, int] = {}
    for holder, name, reference in found:
        data = fetcher.fetch(name, reference)
        holder[name] = base64.b64encode(data).decode("ascii")
        sizes[name] = len(data)
        done.append({"field": name, "reference": _shown(reference), "bytes": str(len(data))})
    if found:
        total = len(json.dumps(payload, separators=(",", ":")))
        most = fetcher.settings.max_body_bytes
        if total > most:
            name = max(sizes, key=lambda k: sizes[k])
            raise InvalidRequestError(
                f"with its images fetched ({', '.join(f'{k}: {v} bytes' for k, v in sizes.items())}) the request has "
                f"{total} bytes; a worker takes at most {most} (SDMAKER_MAX_BODY_BYTES): use smaller images",
                field=name, allowed=f"request <= {most} bytes with the images base64-encoded")
    return done


def resolve_record(body: bytes, content_type: str | None, fetcher: ImageFetcher) -> bytes:
    """A batch transform unit with its image references fetched: one JSON document, or JSON lines
    (``MultiRecord``). A unit without references, or that is not JSON, is returned as it is (the worker answers
    for it)."""
    lowered = body.lower()
    if not any(f"{s}://".encode() in lowered for s in ("s3", "http", "https")):
        return body
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in ("", "application/json", "application/jsonlines", "application/x-jsonlines"):
        return body
    try:
        docs = [json.loads(body)]
        lines = False
    except ValueError:
        try:
            docs = [json.loads(line) for line in body.split(b"\n") if line.strip()]
        except ValueError:
            return body
        lines = True
    changed = False
    for doc in docs:
        changed = bool(resolve_payload(doc, fetcher)) or changed
    if not changed:
        return body
    if not lines:
        return json.dumps(docs[0], separators=(",", ":")).encode()
    return b"\n".join(json.dumps(d, separators=(",", ":")).encode() for d in docs)


def _shown(reference: str) -> str:
    """A reference as error messages show it: bounded, UTF-8 safe, without a URL's ``user:password@``."""
    scheme, sep, rest = reference.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        reference = f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    return utf8_safe(reference if len(reference) <= 200 else reference[:197] + "...")
