"""How one production variant of an endpoint config becomes worker settings.

The pure part of the endpoint manager, kept apart so it can be read (and tested) without the manager's
asyncio machinery: where the model is (``ModelDataUrl`` / ``ModelDataSource``), which folder and
interpreter serve it, which device an instance type maps to, and the model Environment keys sdmaker reads
(``SDMAKER_MAX_BATCH``, ``SAGEMAKER_PROGRAM``) or refuses (:data:`FORBIDDEN_ENV`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import ConfigError
from sdmaker.serving._user_module import module_name

__all__ = ["DEFAULT_MAX_BATCH", "FORBIDDEN_ENV", "cpu_count", "instance_profile", "max_batch_for", "model_ref",
           "program_name", "python_for", "resolve_model_dir"]

_ACCELERATED = ("ml.g", "ml.p", "ml.inf", "ml.trn")
#: CreateModel Environment keys that would make the worker run code from outside the model artifact.
FORBIDDEN_ENV = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME",
                           "PYTHONINSPECT", "PYTHONUSERBASE", "PYTHONEXECUTABLE", "PYTHONSAFEPATH"})
#: Step batching width for the default handler when the model's Environment has no SDMAKER_MAX_BATCH.
DEFAULT_MAX_BATCH = 8


def instance_profile(instance_type: str | None) -> tuple[str, str | None]:
    """(worker ``--device``, warning or None): ``auto`` for accelerated instance types, ``cpu`` otherwise."""
    itype = (instance_type or "").lower()
    if itype.startswith(_ACCELERATED) or itype == "local_gpu":
        if not any(Path("/dev").glob("nvidia[0-9]*")):
            return "auto", f"instance type {itype} asks for a GPU but none is present: running on the CPU"
        return "auto", None
    return "cpu", None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def model_ref(container: dict[str, Any]) -> str:
    """Where the model data is: ``ModelDataUrl`` or ``ModelDataSource.S3DataSource.S3Uri``."""
    ref = container.get("ModelDataUrl") or (container.get("ModelDataSource") or {}).get("S3DataSource", {}).get(
        "S3Uri")
    if not ref:
        if (container.get("Environment") or {}).get("HF_MODEL_ID"):
            raise ConfigError("HF_MODEL_ID (download from the Hugging Face Hub at startup) is not supported: "
                              "pass model_data (s3://, a local path or a store name)", field="HF_MODEL_ID")
        raise ConfigError("the model has no ModelDataUrl: pass model_data (s3://, a local path or a store name)",
                          field="ModelDataUrl")
    return str(ref).removeprefix("file://")


def resolve_model_dir(ref: str, settings: Settings) -> tuple[Path, str | None]:
    """Turn a model reference into a local folder (and its digest), via the store when available."""
    try:
        from sdmaker.store import resolve_model
    except ImportError:  # the store is optional for plain folders
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model {ref!r} is not a folder and the store is unavailable", field="ModelDataUrl",
                              value=ref) from None
        return path, None
    resolved = resolve_model(ref, settings)
    return Path(resolved.path), getattr(resolved, "digest", None)


def python_for(model_dir: Path, settings: Settings) -> str:
    """The interpreter for this model (an isolated env when code/requirements.txt needs one)."""
    try:
        from sdmaker.serving._requirements import prepare_model_environment
    except ImportError:
        return sys.executable
    return prepare_model_environment(model_dir, settings, allow_install=not settings.offline)


def max_batch_for(env: dict[str, str], default_handler: bool) -> int:
    """``SDMAKER_MAX_BATCH`` from the model's Environment, else the default for this kind of handler."""
    raw = env.get("SDMAKER_MAX_BATCH", "").strip()
    if not raw:
        return DEFAULT_MAX_BATCH if default_handler else 0
    if not raw.isdigit() or int(raw) > 256:
        raise ConfigError(f"SDMAKER_MAX_BATCH={raw!r} must be an integer from 0 (off) to 256",
                          field="SDMAKER_MAX_BATCH", value=raw)
    return int(raw)


def program_name(env: dict[str, str]) -> str:
    """The handler file in ``code/``, by the rule the worker loads it with (``SAGEMAKER_PROGRAM``; unset or
    empty, as the SDK sends it without an entry_point, means ``inference.py``: contract 1.7)."""
    return module_name(env.get("SAGEMAKER_PROGRAM")) + ".py"
