"""Serving: the SageMaker-compatible model server (worker) and the platform daemon.

The model server (``sdmaker serve``, ``python -m sdmaker.serving.worker``) obeys the SageMaker inference
container contract with the Hugging Face inference toolkit's handler semantics; the daemon spawns its
workers and proxies to them.
"""

from sdmaker.serving._container import (
    DEFAULT_MAX_BODY_BYTES,
    EXIT_BIND_FAILED,
    EXIT_LOAD_FAILED,
    ModelServer,
    create_app,
    run_server,
    write_status,
)
from sdmaker.serving._handler import HandlerResponse, HandlerService, SdModel, request_from_payload
from sdmaker.serving._requirements import (
    EnvironmentPlan,
    check_requirements,
    plan_model_environment,
    prepare_model_environment,
)
from sdmaker.serving._user_module import Context, load_user_module

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "EXIT_BIND_FAILED",
    "EXIT_LOAD_FAILED",
    "Context",
    "EnvironmentPlan",
    "HandlerResponse",
    "HandlerService",
    "ModelServer",
    "SdModel",
    "check_requirements",
    "create_app",
    "load_user_module",
    "plan_model_environment",
    "prepare_model_environment",
    "request_from_payload",
    "run_server",
    "write_status",
]

# The platform daemon (``sdmaker up``): SageMaker control plane + runtime API, endpoint manager, worker pools.
from sdmaker.serving._daemon import create_app as create_daemon_app  # noqa: E402
from sdmaker.serving._daemon import run_daemon  # noqa: E402
from sdmaker.serving._endpoints import EndpointManager, EndpointRuntime  # noqa: E402
from sdmaker.serving._pool import WorkerPool  # noqa: E402
from sdmaker.serving._workers import WorkerSpec, WorkerState  # noqa: E402

__all__ += ["EndpointManager", "EndpointRuntime", "WorkerPool", "WorkerSpec", "WorkerState", "create_daemon_app",
            "run_daemon"]
