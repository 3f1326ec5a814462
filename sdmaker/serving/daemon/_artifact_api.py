"""``GET /sdmaker/v1/artifacts/{digest}``: a model's files, for Ray replicas on other nodes (:mod:`sdmaker.serving.daemon.ray`).

Always authenticated, on loopback too: the bearer token the daemon hands its replicas, or the daemon's
own credentials (SigV4 / API token). Only models of endpoints running on Ray are served, by content
digest; the replica verifies the digest of what it receives.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from sdmaker.errors import ModelNotFoundError
from sdmaker.serving.daemon._auth import verify_request
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon.ray._artifacts import tar_stream

__all__ = ["artifact_response"]


async def artifact_response(request: Request, digest: str) -> Response:
    """The model ``digest`` as an uncompressed tar stream (see the module docstring)."""
    manager: EndpointManager = request.state.manager
    cluster = manager.ray
    if cluster is None or not cluster.token_ok(request.headers.get("authorization")):
        headers: dict[str, list[str]] = {}
        for key, value in request.headers.raw:
            headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        verify_request(request.state.settings, method=request.method, path=request.url.path,
                       query=request.scope.get("query_string", b"").decode("latin-1"), headers=headers, body=b"")
    folder = cluster.exports.get(digest) if cluster is not None else None
    if folder is None or not folder.is_dir():
        raise ModelNotFoundError(f"no model with digest {digest} is served to Ray replicas by this daemon",
                                 model=digest)
    return StreamingResponse(tar_stream(folder), media_type="application/x-tar",
                             headers={"X-Sdmaker-Model-Digest": digest})



