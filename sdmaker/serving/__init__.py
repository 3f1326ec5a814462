"""Serving: the SageMaker-compatible model server (worker) and the platform daemon, one sub-package each.

- :mod:`sdmaker.serving.container`: the worker process (``sdmaker serve``, ``python -m
  sdmaker.serving.container``) obeying the SageMaker inference container contract with the Hugging Face
  inference toolkit's handler semantics;
- :mod:`sdmaker.serving.daemon`: the daemon (``sdmaker up``) that spawns workers and proxies to them;
- shared by both, and light: :mod:`._protocol` (the :class:`WorkerConfig` a worker is started with, status,
  headers, exit codes), :mod:`._http` (body-size check, loopback rule), :mod:`._requirements` (a model's
  own Python environment, prepared before its worker starts).
"""

from sdmaker.serving._http import is_loopback
from sdmaker.serving._protocol import EXIT_BIND_FAILED, EXIT_LOAD_FAILED, WorkerConfig
from sdmaker.serving._requirements import (
    EnvironmentPlan,
    check_requirements,
    plan_model_environment,
    prepare_model_environment,
)
from sdmaker.serving.container import (
    DEFAULT_MAX_BODY_BYTES,
    Context,
    HandlerResponse,
    HandlerService,
    ModelServer,
    SdModel,
    create_app,
    load_user_module,
    request_from_payload,
    run_server,
    write_status,
)
from sdmaker.serving.container import serve as serve_worker
from sdmaker.serving.daemon import (
    EndpointManager,
    LiveEndpoint,
    WorkerPool,
    WorkerSpec,
    WorkerState,
    check_bind,
    run_daemon,
)
from sdmaker.serving.daemon import create_app as create_daemon_app

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "EXIT_BIND_FAILED",
    "EXIT_LOAD_FAILED",
    "Context",
    "EndpointManager",
    "EnvironmentPlan",
    "HandlerResponse",
    "HandlerService",
    "LiveEndpoint",
    "ModelServer",
    "SdModel",
    "WorkerConfig",
    "WorkerPool",
    "WorkerSpec",
    "WorkerState",
    "check_bind",
    "check_requirements",
    "create_app",
    "create_daemon_app",
    "is_loopback",
    "load_user_module",
    "plan_model_environment",
    "prepare_model_environment",
    "request_from_payload",
    "run_daemon",
    "run_server",
    "serve_worker",
    "write_status",
]
