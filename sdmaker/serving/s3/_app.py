"""The built-in S3 as an ASGI app, mounted by the daemon at ``/s3`` (one port for everything).

botocore keeps an endpoint URL's path and, for an IP-address host such as ``127.0.0.1``, addresses buckets
path-style, so ``AWS_ENDPOINT_URL_S3=http://127.0.0.1:8765/s3`` makes every S3 call
``<METHOD> /s3/<bucket>/<key>?<subresource>``. S3 chooses the operation by method, sub-resource query
parameters and a few headers (``x-amz-copy-source``), not by route, so this is one dispatcher
(:mod:`._operations`) rather than a router.

This app checks its own credentials with the daemon's rules (the daemon's FastAPI dependencies do not
reach a mounted app): when the daemon requires authentication, SigV4 (header or presigned query) or the
bearer token. Uploads are streamed to disk, never held in memory: the signature is checked first against
the declared ``X-Amz-Content-SHA256``, then the received bytes against that digest.

Every refusal is S3's XML ``<Error>`` with S3's status code; an unexpected failure is logged and answered
``500 InternalError`` without details.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sdmaker.config import S3_PATH_PREFIX, Settings
from sdmaker.errors import AuthenticationError, PayloadTooLargeError, S3ApiError
from sdmaker.serving.s3._objects import ObjectStore
from sdmaker.serving.s3._operations import Call, dispatch
from sdmaker.serving.s3._xml import error_document

__all__ = ["S3App", "Verifier", "mount_s3"]

logger = logging.getLogger(__name__)

#: ``verify_request`` of :mod:`sdmaker.serving.daemon._auth` (passed in: serving.s3 does not import the daemon).
Verifier = Callable[..., str]


class S3App:
    """ASGI app serving the S3 API for ``settings.s3_dir``; ``auth``: whether requests must authenticate."""

    def __init__(self, settings: Settings, *, auth: bool, verify: Verifier, prefix: str = S3_PATH_PREFIX) -> None:
        self.settings = settings
        self.auth = auth
        self.verify = verify
        self.prefix = prefix
        self._store: ObjectStore | None = None
        self._open_lock = threading.Lock()

    @property
    def store(self) -> ObjectStore:
        """The object store, opened on first use (recovery after a crash runs then)."""
        with self._open_lock:
            if self._store is None:
                self._store = ObjectStore(self.settings.s3_dir, peer_blobs=[self.settings.store_dir / "blobs"])
            return self._store

    def close(self) -> None:
        with self._open_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan reaches a mounted app; websockets are not S3
            return
        request = Request(scope, receive)
        request_id = uuid.uuid4().hex[:16].upper()
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        raw_path = raw.decode("latin-1").split("?", 1)[0]
        resource = raw_path[len(self.prefix):] if raw_path.startswith(self.prefix) else raw_path
        try:
            call = self._parse(request, raw_path, resource)
            await self._authenticate(request, call, raw_path)
            response = await dispatch(call, await asyncio.to_thread(lambda: self.store))
        except S3ApiError as exc:
            response = _error_response(exc, unquote(resource) or "/", request_id, head=request.method == "HEAD")
        except AuthenticationError as exc:
            client = request.client.host if request.client else "?"
            logger.warning("refused unauthenticated S3 request %s %s from %s: %s", request.method, raw_path, client,
                           exc.message)
            code = "SignatureDoesNotMatch" if "signature" in exc.message.lower() else "AccessDenied"
            response = _error_response(S3ApiError(code, exc.message, 403), unquote(resource) or "/", request_id,
                                       head=request.method == "HEAD")
        except ClientDisconnect:
            logger.info("S3 client went away during %s %s", request.method, raw_path)
            return
        except Exception:
            logger.exception("S3 %s %s failed", request.method, raw_path)
            response = _error_response(S3ApiError("InternalError", "We encountered an internal error. Please try "
                                                  "again.", 500), unquote(resource) or "/", request_id,
                                       head=request.method == "HEAD")
        response.headers["x-amz-request-id"] = request_id
        await response(scope, receive, send)

    def _parse(self, request: Request, raw_path: str, resource: str) -> Call:
        try:
            path = unquote(resource, errors="strict")
        except UnicodeDecodeError:
            raise S3ApiError("InvalidURI", "Couldn't parse the specified URI (it is not UTF-8).", 400) from None
        path = path[1:] if path.startswith("/") else path
        bucket, _, key = path.partition("/")
        query: dict[str, str] = {}
        for name, value in request.query_params.multi_items():
            query.setdefault(name, value)
        return Call(method=request.method, bucket=bucket, key=key, query=query, headers=request.headers,
                    request=request, settings=self.settings, raw_path=raw_path)

    async def _authenticate(self, request: Request, call: Call, raw_path: str) -> None:
        """Check credentials when required; small bodies are read here, uploads are verified unread."""
        if call.streams_body:
            body = None
        else:
            body = await _read_small(request)
            call.body = body
        if not self.auth:
            return
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.raw:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        who = self.verify(self.settings, method=request.method, path=raw_path,
                          query=request.scope.get("query_string", b"").decode("latin-1"), headers=headers, body=body)
        logger.debug("authenticated S3 %s %s as %s", request.method, raw_path, who)


def mount_s3(app: Any, settings: Settings, *, auth: bool, verify: Verifier) -> S3App:
    """Serve the built-in S3 at ``S3_PATH_PREFIX`` of the starlette/FastAPI ``app``.

    Both ``/s3`` (ListBuckets: botocore requests the endpoint URL itself, without a trailing slash) and
    ``/s3/...`` go to it; a mount alone would answer ``/s3`` with a redirect, which botocore takes for a
    region redirect.
    """
    from starlette.routing import Mount, Route

    s3 = S3App(settings, auth=auth, verify=verify)
    app.router.routes.append(Route(S3_PATH_PREFIX, s3, include_in_schema=False))
    app.router.routes.append(Mount(S3_PATH_PREFIX, app=s3))
    return s3


async def _read_small(request: Request) -> bytes:
    """A non-upload body (XML documents): at most a few MiB, else ``MaxMessageLengthExceeded``."""
    from sdmaker.serving._http import read_body
    from sdmaker.serving.s3._xml import MAX_XML_BYTES

    try:
        return await read_body(request, MAX_XML_BYTES)
    except PayloadTooLargeError:
        raise S3ApiError("MaxMessageLengthExceeded", f"Your request was too big (at most {MAX_XML_BYTES} bytes "
                         "for this operation).", 400) from None


def _error_response(exc: S3ApiError, resource: str, request_id: str, *, head: bool) -> Response:
    headers: dict[str, Any] = {}
    if exc.aws_code == "SlowDown":
        headers["Retry-After"] = "1"
    if head:  # HEAD answers carry no body: botocore reads the status alone (404 -> "404"/NotFound)
        return Response(status_code=exc.status, headers=headers)
    return Response(error_document(exc, resource, request_id), status_code=exc.status, headers=headers,
                    media_type="application/xml")
