"""The platform daemon (``sdmaker up``): SageMaker's control plane and runtime API over local worker pools.

A request goes: :mod:`._app` (routes, auth) -> :mod:`._invoke_api` (InvokeEndpoint wire format, the one
validation of a default-handler body) -> :mod:`._endpoints` (which endpoint, its queue and statistics in
:mod:`._live`) -> :mod:`._pool` (a free worker slot) -> :mod:`._worker_process` (one worker process) ->
HTTP to :mod:`sdmaker.serving.container`. It never imports the container package.
"""

from sdmaker.serving.daemon._app import create_app, run_daemon
from sdmaker.serving.daemon._auth import check_bind
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._live import LiveEndpoint
from sdmaker.serving.daemon._pool import WorkerPool
from sdmaker.serving.daemon._worker_process import WorkerSpec, WorkerState

__all__ = ["EndpointManager", "LiveEndpoint", "WorkerPool", "WorkerSpec", "WorkerState", "check_bind", "create_app",
           "run_daemon"]
