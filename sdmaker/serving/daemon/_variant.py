"""How one production variant of an endpoint config becomes a :class:`VariantPlan`: workers to start, and how.

One concept, kept apart from the endpoint manager's asyncio machinery so it can be read (and tested) on
its own: where the model is (``ModelDataUrl`` / ``ModelDataSource``), which folder and interpreter serve
it, which device an instance type maps to, how many workers with how many torch threads and which
environment (:func:`worker_environment`), and the model Environment keys sdmaker reads
(``SDMAKER_MAX_BATCH``, ``SAGEMAKER_PROGRAM``, ``SAGEMAKER_MODEL_SERVER_*``, ``SDMAKER_MAX_QUEUE``) or
refuses (:data:`FORBIDDEN_ENV`). :func:`plan_variant` puts them together into the
:class:`~sdmaker.serving._protocol.WorkerConfig` every worker of the variant gets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmaker.config import Settings, load_settings
from sdmaker.errors import ConfigError
from sdmaker.serving._protocol import WorkerConfig, module_name
from sdmaker.serving._requirements import prepare_model_environment
from sdmaker.serving.daemon._admission import memory_budget_pixels

__all__ = ["DAEMON_SECRETS", "DEFAULT_MAX_BATCH", "FORBIDDEN_ENV", "VariantPlan", "cpu_count", "instance_profile",
           "max_batch_for", "memory_budget_for", "model_ref", "plan_variant", "program_name", "python_for", "resolve_model_dir",
           "worker_environment"]

_ACCELERATED = ("ml.g", "ml.p", "ml.inf", "ml.trn")
#: CreateModel Environment keys that would make the worker run code from outside the model artifact.
FORBIDDEN_ENV = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME",
                           "PYTHONINSPECT", "PYTHONUSERBASE", "PYTHONEXECUTABLE", "PYTHONSAFEPATH"})
#: Step batching width for the default handler when the model's Environment has no SDMAKER_MAX_BATCH.
DEFAULT_MAX_BATCH = 8
#: Never handed to worker processes: they run the model's own code, which must not see the daemon's secrets.
DAEMON_SECRETS = ("SDMAKER_SECRET_ACCESS_KEY", "SDMAKER_API_TOKEN", "SDMAKER_ACCESS_KEY_ID")


def instance_profile(instance_type: str | None) -> tuple[str, str | None]:
    """(worker device, warning or None): ``auto`` for accelerated instance types, ``cpu`` otherwise."""
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


def resolve_model_dir(ref: str, settings: Settings) -> tuple[Path, str | None, str | None]:
    """Turn a model reference into a local folder, its digest and its name, via the store when available.

    The worker is handed the digest and name (:class:`~sdmaker.serving._protocol.WorkerConfig`), so it
    neither hashes the weights again nor names the model differently from ``sdmaker serve``.
    """
    try:
        from sdmaker.store import resolve_model
    except ImportError:  # the store is optional for plain folders
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model {ref!r} is not a folder and the store is unavailable", field="ModelDataUrl",
                              value=ref) from None
        return path, None, None
    resolved = resolve_model(ref, settings)
    return Path(resolved.path), resolved.digest, resolved.name


def python_for(model_dir: Path, settings: Settings) -> str:
    """The interpreter for this model (an isolated env when code/requirements.txt needs one)."""
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


def worker_environment(settings: Settings, model_env: Mapping[str, str], count: int) -> dict[str, str]:
    """A worker's environment: the daemon's (minus its secrets), the model's, and a torch thread count."""
    base_env = {k: v for k, v in settings.env.items() if k not in DAEMON_SECRETS}
    worker_env = {**base_env, **{k: v for k, v in model_env.items() if k not in FORBIDDEN_ENV},
                  "SDMAKER_HOME": str(settings.home)}
    # N workers x all-cores torch threads oversubscribe the CPU: OpenMP threads then spin-wait on each
    # other (measured here: sd1-tiny 0.25 s/request with 1 thread, 1.6-13 s with 2 on 2 busy cores).
    # Split the cores between the workers unless the model or the user chose a thread count.
    threads = worker_env.get("OMP_NUM_THREADS") or str(max(1, cpu_count() // count))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        worker_env.setdefault(var, threads)
    worker_env.setdefault("PYTHONUNBUFFERED", "1")
    return worker_env


@dataclass(frozen=True)
class VariantPlan:
    """What an endpoint runs for one production variant: its workers' configuration and the endpoint's limits."""

    config: WorkerConfig
    count: int
    default_handler: bool
    instance_type: str | None
    model_name: str
    startup_timeout_s: float
    #: from the model's Environment; ``None``: the daemon's default
    timeout_s: float | None
    max_queue: int | None
    #: pixels (height x width x images, a batch summed) one worker may hold at once (._admission)
    memory_budget_pixels: int
    #: said once in the endpoint log (e.g. a GPU instance type on a machine without one)
    warning: str | None
    #: ``SAGEMAKER_MODEL_SERVER_WORKERS``: worker processes per instance (``count`` = instances x this)
    workers_per_instance: int = 1


def plan_variant(variant: Mapping[str, Any], model: Mapping[str, Any], *, model_dir: Path, digest: str | None,
                 display_name: str | None, log_file: Path, settings: Settings) -> VariantPlan:
    """Read ``variant`` (a ProductionVariant) and ``model`` (a CreateModel body) served from ``model_dir``."""
    container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
    env = {str(k): str(v) for k, v in (container.get("Environment") or {}).items()}
    default_handler = not (model_dir / "code" / program_name(env)).is_file()
    per_instance = int(env.get("SAGEMAKER_MODEL_SERVER_WORKERS") or 1)
    count = max(1, int(variant.get("InitialInstanceCount") or 1)) * max(1, per_instance)
    device, warning = instance_profile(variant.get("InstanceType"))
    environment = worker_environment(settings, env, count)
    effective = load_settings(environment)  # the model's Environment first, then the daemon's
    config = WorkerConfig(model_dir=model_dir, port=0, model_name=display_name, model_digest=digest, device=device,
                          dtype=effective.dtype,  # SDMAKER_DTYPE, the model's Environment first
                          max_batch=max_batch_for(env, default_handler), max_body_bytes=settings.max_body_bytes,
                          trust_daemon_validation=True, environment=environment, log_file=log_file)
    timeout = env.get("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS")
    queue = env.get("SDMAKER_MAX_QUEUE")
    return VariantPlan(
        config=config, count=count, default_handler=default_handler, instance_type=variant.get("InstanceType"),
        model_name=str(variant["ModelName"]), warning=warning, workers_per_instance=max(1, per_instance),
        startup_timeout_s=float(variant.get("ContainerStartupHealthCheckTimeoutInSeconds")
                                or settings.startup_timeout_s),
        timeout_s=float(timeout) if timeout else None, max_queue=int(queue) if queue else None,
        memory_budget_pixels=effective.memory_budget_pixels or memory_budget_pixels(
            model_dir, effective.dtype, effective.memory_bytes // count))


def memory_budget_for(plan: VariantPlan, workers: int) -> int:
    """The per-worker memory budget (pixels) when ``workers`` of ``plan`` share the endpoint's memory: what a
    resized pool's workers get (autoscaling), by the rule :func:`plan_variant` applies at start."""
    effective = load_settings(plan.config.environment or {})
    return effective.memory_budget_pixels or memory_budget_pixels(
        plan.config.model_dir, effective.dtype, effective.memory_bytes // max(1, workers))
