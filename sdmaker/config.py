"""Settings, read from the environment in this one module.

No other sdmaker module reads ``os.environ``: entry points (the CLI callback, the server's
``create_app``, worker processes) call :func:`load_settings` once and pass the frozen result down.
That keeps tests hermetic (they build a ``Settings`` by hand) and makes every knob discoverable here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdmaker.errors import ConfigError

__all__ = ["Settings", "load_settings"]

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Resolved configuration.

    Attributes:
        home: root of all sdmaker state (store, endpoints DB, logs); ``SDMAKER_HOME``, default ``~/.sdmaker``.
        offline: never touch the network for models (``SDMAKER_OFFLINE`` or ``HF_HUB_OFFLINE``).
        debug: show tracebacks in the CLI (``SDMAKER_DEBUG``).
        device: ``auto`` | ``cpu`` | ``cuda`` (``SDMAKER_DEVICE``).
        dtype: ``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (``SDMAKER_DTYPE``).
        aws_endpoint_url_s3: S3-compatible endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``).
        env: the raw environment snapshot, for the few places (subprocess spawning) that must pass it on.
    """

    home: Path
    offline: bool = False
    debug: bool = False
    device: str = "auto"
    dtype: str = "auto"
    aws_endpoint_url_s3: str | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def endpoints_dir(self) -> Path:
        return self.home / "endpoints"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlruns"

    def with_home(self, home: Path) -> Settings:
        return replace(self, home=home)


def _flag(env: Mapping[str, str], *names: str) -> bool:
    return any(env.get(n, "").strip().lower() in _TRUE for n in names)


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = env.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed: {', '.join(allowed)}", field=name, value=value)
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default: the process environment)."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("SDMAKER_HOME") or Path.home() / ".sdmaker").expanduser()
    return Settings(
        home=home,
        offline=_flag(env, "SDMAKER_OFFLINE", "HF_HUB_OFFLINE"),
        debug=_flag(env, "SDMAKER_DEBUG"),
        device=_choice(env, "SDMAKER_DEVICE", ("auto", "cpu", "cuda"), "auto"),
        dtype=_choice(env, "SDMAKER_DTYPE", ("auto", "fp32", "bf16", "fp16"), "auto"),
        aws_endpoint_url_s3=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        env=env,
    )
