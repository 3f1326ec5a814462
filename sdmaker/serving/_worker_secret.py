"""Per-worker secrets: a daemon's workers answer ``/invocations`` only to that daemon.

Why: worker ports are plain loopback TCP ports, so without a secret any local process (or a web page
through DNS rebinding, which :mod:`._hosts` also stops) could call a model directly, around the daemon's
authentication, queue and limits. Each worker process gets a fresh random secret when it is (re)started;
the worker's container server then requires ``Authorization: Bearer <secret>`` on every route but
``/ping`` (:func:`sdmaker.serving.container._server.create_app`), and the pool sends it with each request.

Today the secret travels in the worker's environment (``SDMAKER_WORKER_TOKEN``, read through
:mod:`sdmaker.config` as ``Settings.worker_token``): an environment is readable only by the worker's own
user (``/proc/<pid>/environ`` is 0400), unlike the command line. ``sdmaker serve`` sets none, so a
standalone container keeps SageMaker's open ``/invocations`` on loopback.
"""

from __future__ import annotations

import hmac
import secrets

__all__ = ["WORKER_TOKEN_ENV", "auth_header", "new_worker_secret", "token_matches"]

#: The worker environment variable that carries the secret (see :attr:`sdmaker.config.Settings.worker_token`).
WORKER_TOKEN_ENV = "SDMAKER_WORKER_TOKEN"


def new_worker_secret() -> str:
    """A fresh secret for one worker process (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def auth_header(secret: str) -> dict[str, str]:
    """The header the daemon sends with each request to a worker holding ``secret``."""
    return {"Authorization": f"Bearer {secret}"}


def token_matches(authorization: str, token: str) -> bool:
    """True when an ``Authorization`` header value carries ``Bearer <token>`` (compared in constant time)."""
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
