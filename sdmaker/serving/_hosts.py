"""Host and Origin checks for every sdmaker HTTP server (the daemon and the worker's container server).

Why: the daemon deploys ``code/inference.py``, so its control plane is as sensitive as a shell. A web
page cannot reach 127.0.0.1 directly with its own origin's rights, but through DNS rebinding
(``rebind.attacker.example`` first resolving to the attacker, then to 127.0.0.1) the browser sends the
page's requests to the daemon with ``Host: rebind.attacker.example``. Refusing any ``Host`` that is not
the address the server is bound to (plus the loopback names on loopback) stops that, as Jupyter, MLflow
and Ray did after similar reports; refusing a foreign ``Origin`` stops plain cross-site writes
(``fetch(..., {mode: "no-cors"})`` still sends the request). No CORS headers are ever sent.

More names (a reverse proxy, a LAN host name) are allowed with ``SDMAKER_ALLOWED_HOSTS`` (comma
separated host names, any port; ``*`` turns the Host check off). The checks are a pure ASGI
middleware so they cover every route, including ones added later (web UI, OpenAI API).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sdmaker.errors import AuthenticationError
from sdmaker.serving._http import is_loopback

__all__ = ["ALLOWED_HOSTS_SETTING", "HostGuard", "HostPolicy", "split_host"]

logger = logging.getLogger(__name__)

#: The setting named in every refusal, so the fix is one search away.
ALLOWED_HOSTS_SETTING = "SDMAKER_ALLOWED_HOSTS"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD = ("0.0.0.0", "::", "")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def split_host(value: str) -> tuple[str, int | None]:
    """``"name:8765"`` -> ``("name", 8765)``; ``"[::1]:80"`` -> ``("::1", 80)``; lower-cased; port None if absent.

    A malformed value gives ``("", None)``, which no policy allows.
    """
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return "", None
        port_text = rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    elif ":" in value:  # a bare IPv6 address without brackets is not a valid Host
        return "", None
    else:
        host, port_text = value, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return "", None
        return host.rstrip("."), int(port_text)
    return host.rstrip("."), None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """Which ``Host`` values one server answers.

    Args:
        bind: the address the server listens on (``127.0.0.1``, ``::1``, ``0.0.0.0``, a LAN address).
        port: its port; a ``Host`` with another port is refused (``None``: any port, for in-process tests).
        extra: names from ``SDMAKER_ALLOWED_HOSTS`` (any port); ``"*"`` allows every Host.
    """

    bind: str
    port: int | None = None
    extra: tuple[str, ...] = ()

    def allows_host(self, value: str) -> bool:
        host, port = split_host(value)
        if not host:
            return False
        if "*" in self.extra or host in {split_host(e)[0] for e in self.extra}:
            return True
        if self.port is not None and port is not None and port != self.port:
            return False
        if self.port is not None and port is None and self.port != 80:
            return False
        bind = self.bind.strip("[]").lower()
        if host == bind:
            return True
        if bind in _WILDCARD:
            # listening everywhere: any literal address of this machine; names only when configured
            # (an IP-literal Host cannot come from DNS rebinding, which needs a name the page controls)
            return _is_ip(host) or host == "localhost"
        return is_loopback(bind) and host in _LOOPBACK_NAMES

    def allows_origin(self, origin: str) -> bool:
        """Same-origin only: the Origin's host must itself be an allowed Host (``null`` never is)."""
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        return self.allows_host(parts.netloc)


class HostGuard:
    """ASGI middleware: 403 for a foreign ``Host`` or ``Origin``, with an AWS-shaped JSON body.

    The body is ``{"__type": "AccessDeniedException", "message": ...}`` with ``x-amzn-ErrorType`` (what
    botocore reads for both the control plane and the runtime API) and ``X-Sdmaker-Error-Code``.
    """

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope.get("headers") or [])
        host = headers.get("host", "")
        origin = headers.get("origin")
        problem = None
        if not self.policy.allows_host(host):
            problem = (f"Host {host!r} is not an address this sdmaker server answers (bound to "
                       f"{self.policy.bind}); to allow more host names set {ALLOWED_HOSTS_SETTING}")
        elif origin is not None and not self.policy.allows_origin(origin):
            problem = (f"requests from the web page origin {origin!r} are refused (cross-site requests could deploy "
                       f"code); to allow that origin's host set {ALLOWED_HOSTS_SETTING}")
        if problem is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        logger.warning("refused %s %s from %s: %s", scope.get("method", "WS"), scope.get("path"), client[0], problem)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        err = AuthenticationError(problem, setting=ALLOWED_HOSTS_SETTING)
        body = json.dumps({"__type": "AccessDeniedException", "message": problem}).encode()
        await send({"type": "http.response.start", "status": 403, "headers": [
            (b"content-type", b"application/x-amz-json-1.1"), (b"content-length", str(len(body)).encode()),
            (b"x-amzn-errortype", b"AccessDeniedException"), (b"x-sdmaker-error-code", err.code.encode())]})
        await send({"type": "http.response.body", "body": body})


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in raw:
        out.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return out
