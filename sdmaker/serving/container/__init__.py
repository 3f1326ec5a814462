"""The worker process: one model behind the SageMaker inference container contract.

``python -m sdmaker.serving.container`` reads one :class:`~sdmaker.serving._protocol.WorkerConfig` line
on stdin and serves ``GET /ping`` and ``POST /invocations`` (:mod:`._server`), answering each invocation
with the handler (:mod:`._handler`: the Hugging Face toolkit's hooks, :mod:`._user_module` loads
``code/inference.py``, :mod:`._codecs` turns bodies into data and back). It never imports the daemon.
"""

from sdmaker.serving.container._handler import HandlerResponse, HandlerService, SdModel, request_from_payload
from sdmaker.serving.container._main import become, main, serve
from sdmaker.serving.container._server import DEFAULT_MAX_BODY_BYTES, ModelServer, create_app, run_server, write_status
from sdmaker.serving.container._user_module import Context, load_user_module

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Context", "HandlerResponse", "HandlerService", "ModelServer", "SdModel",
           "become", "create_app", "load_user_module", "main", "request_from_payload", "run_server", "serve",
           "write_status"]
