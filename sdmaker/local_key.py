"""The local key: credentials that keep other users of this machine off the daemon's control plane.

Host and Origin checks stop web pages; they do not stop another account on the same machine, which can
connect to 127.0.0.1 like anyone. With ``SDMAKER_LOCAL_KEY=1``, ``sdmaker up`` creates
``$SDMAKER_HOME/local-key.json`` at its first start (mode 0600, so only the daemon's user can read it)
and the daemon requires it for control-plane calls (the ones that deploy code) even on loopback.
:func:`sdmaker.config.load_settings` reads it back, so the CLI, :class:`sdmaker.client.Client` (bearer
token) and ``sdmaker env`` (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` for boto3 and the SageMaker
SDK, which sign with SigV4) use it without further setup.

This module only reads and writes the file; :mod:`sdmaker.config` decides what it means.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from sdmaker.errors import ConfigError
from sdmaker.files import write_once

__all__ = ["LOCAL_KEY_FILE", "LocalKey", "ensure_local_key", "local_key_path", "read_local_key"]

LOCAL_KEY_FILE = "local-key.json"


@dataclass(frozen=True)
class LocalKey:
    """One SigV4 key pair (the secret doubles as the bearer token of the Python client and the CLI)."""

    access_key_id: str
    secret_access_key: str


def local_key_path(home: Path) -> Path:
    return Path(home) / LOCAL_KEY_FILE


def read_local_key(home: Path) -> LocalKey | None:
    """The key stored under ``home``, or None when there is none yet.

    Raises:
        ConfigError: the file is readable by other users (it would protect nothing) or malformed.
    """
    path = local_key_path(home)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the local key {path}: {exc}", field="SDMAKER_LOCAL_KEY") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the local key {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                              f"run: chmod 600 {path}", field="SDMAKER_LOCAL_KEY")
        raw = fh.read(4096)
    try:
        data = json.loads(raw)
        key = LocalKey(str(data["access_key_id"]), str(data["secret_access_key"]))
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"the local key {path} is malformed; delete it and restart `sdmaker up` to make a new one",
                          field="SDMAKER_LOCAL_KEY") from None
    if not key.access_key_id or len(key.secret_access_key) < 32:
        raise ConfigError(f"the local key {path} is malformed; delete it and restart `sdmaker up`",
                          field="SDMAKER_LOCAL_KEY")
    return key


def ensure_local_key(home: Path) -> LocalKey:
    """The key under ``home``, created now (0600, written whole or not at all) if there is none."""
    existing = read_local_key(home)
    if existing is not None:
        return existing
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    key = LocalKey("SDMK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(32))
    data = json.dumps({"access_key_id": key.access_key_id, "secret_access_key": key.secret_access_key})
    # never replaces a key another `sdmaker up` wrote meanwhile: whichever came first is the key
    write_once(local_key_path(home), data.encode(), mode=0o600)
    stored = read_local_key(home)
    assert stored is not None
    return stored
