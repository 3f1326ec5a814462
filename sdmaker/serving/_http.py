"""HTTP helpers both processes use: the one body-size check, and what counts as a loopback address."""

from __future__ import annotations

import ipaddress
from typing import Any

from sdmaker.errors import PayloadTooLargeError

__all__ = ["is_loopback", "read_body"]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a starlette ``request``, read once and cached on ``request.state``.

    Refuses more than ``limit`` bytes early (declared ``Content-Length``) or as soon as the stream passes it.

    Raises:
        PayloadTooLargeError: the body is over ``limit`` (fields ``size`` and ``limit``).
    """
    cached = getattr(request.state, "body", None)
    if isinstance(cached, bytes):
        return cached
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"Request payload of {declared} bytes exceeds the maximum of {limit} bytes "
                                   "(SageMaker real-time limit 6 MiB).", size=int(declared), limit=limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"Request payload exceeds the maximum of {limit} bytes (SageMaker real-time "
                                       "limit 6 MiB).", size=size, limit=limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request.state.body = body
    return body
