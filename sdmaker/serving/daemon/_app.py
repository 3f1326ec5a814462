"""The platform daemon (``sdmaker up``): one port speaking SageMaker's control plane and runtime API.

Routes:

* ``POST /`` with ``X-Amz-Target: SageMaker.*`` -- the control plane (:mod:`._control_plane`);
* ``POST /`` with ``X-Amz-Target: AnyScaleFrontendService.*`` -- Application Auto Scaling for endpoint
  variants (:mod:`._autoscaling_api`);
* ``POST /endpoints/{name}/invocations`` -- InvokeEndpoint (:mod:`._invoke_api`);
* ``POST /v1/images/generations`` -- the OpenAI Images API (:mod:`._openai`);
* ``GET /`` -- the web UI, and the JSON routes only it uses (:mod:`._ui`);
* ``POST /endpoints/{name}/invocations-response-stream`` -- InvokeEndpointWithResponseStream (:mod:`._stream_api`);
* ``GET /sdmaker/v1/jobs/{id}/events`` -- a job's progress as Server-Sent Events (:mod:`._progress`);
* ``/s3/...`` -- the built-in S3 (:mod:`sdmaker.serving.s3`, ``SDMAKER_S3=off`` turns it off);
* ``POST /endpoints/{name}/async-invocations`` -- InvokeEndpointAsync, and ``/sdmaker/v1/jobs[/{id}[/cancel]]``
  -- the asynchronous inference jobs (:mod:`._async_api`, :mod:`._jobs`);
* ``GET /metrics`` -- Prometheus (:mod:`._metrics`); ``GET /ping`` -- daemon liveness (no auth);
* ``GET /sdmaker/v1/endpoints[/{name}[/logs]]`` -- sdmaker's own view for the CLI (workers, digest,
  request counts, latency percentiles, worker logs); ``GET /sdmaker/v1/standby`` -- the warm standby
  workers that shorten endpoint cold starts (their life follows the daemon's: started after the
  endpoints it restores, killed when it stops).

Everything the app needs lives in its lifespan state (settings, endpoint manager, metrics): there is
no module-level state, so tests can build several apps in one process.

SIGTERM (``sdmaker down``, a supervisor; SageMaker gives a container 30 s): the daemon keeps listening but
answers new invocations ``503 ServiceUnavailable`` with ``Retry-After`` (:class:`Drain`); in-flight ones
finish within :data:`DRAIN_GRACE_S`, or are answered the same clean 503 when it runs out (never a bare
500); then the workers stop and the process exits, well within 30 s. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, TypedDict

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from sdmaker import __version__
from sdmaker.config import Settings, with_local_key
from sdmaker.errors import (
    ERROR_CODE_HEADER,
    AuthenticationError,
    EndpointNotFoundError,
    QueueFullError,
    SdmakerError,
    ServingError,
)
from sdmaker.serving._hosts import HostGuard, HostPolicy
from sdmaker.serving._http import read_body
from sdmaker.serving.daemon._artifact_api import artifact_response
from sdmaker.serving.daemon._async_api import invoke_endpoint_async
from sdmaker.serving.daemon._auth import auth_required, check_bind, verify_request
from sdmaker.serving.daemon._autoscaling_api import TARGET_PREFIX as AUTOSCALING_TARGET
from sdmaker.serving.daemon._autoscaling_api import autoscaling_api
from sdmaker.serving.daemon._control_plane import control_plane, control_plane_error
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._invoke_api import invoke_endpoint, runtime_error_response
from sdmaker.serving.daemon._jobs import AsyncJobs
from sdmaker.serving.daemon._metrics import CONTENT_TYPE_LATEST, DaemonMetrics
from sdmaker.serving.daemon._multi_model import MultiModelPool
from sdmaker.serving.daemon._openai import FILES_PREFIX, add_openai_routes, is_openai_path, openai_error_response
from sdmaker.serving.daemon._progress import job_events
from sdmaker.serving.daemon._shapes import input_shape
from sdmaker.serving.daemon._stream_api import invoke_endpoint_stream
from sdmaker.serving.daemon._ui import add_ui_routes, is_public_path
from sdmaker.serving.s3 import mount_s3

__all__ = ["DRAIN_GRACE_S", "Drain", "create_app", "run_daemon"]

logger = logging.getLogger(__name__)

_LOG_CHUNK = 256 * 1024
#: After SIGTERM, how long in-flight invocations may take to finish (then workers stop: at most 5 s more).
DRAIN_GRACE_S = 18.0
#: Retry-After of the 503 a draining daemon answers.
_DRAIN_RETRY_AFTER_S = 5


class Drain:
    """The daemon's shutdown state: whether it drains, and the invocations still in flight.

    ``begin`` may be called from a signal handler (it only sets fields); everything else runs on the loop.
    """

    def __init__(self, grace_s: float = DRAIN_GRACE_S) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.started = 0.0
        self.in_flight = 0
        self._abort: asyncio.Event | None = None

    def begin(self) -> None:
        if not self.draining:
            self.started = time.monotonic()
            self.draining = True

    @property
    def abort(self) -> asyncio.Event:
        if self._abort is None:
            self._abort = asyncio.Event()
        return self._abort

    def done(self) -> bool:
        """Whether the server may stop now: drained, or the grace is over (in-flight requests are answered)."""
        if not self.draining:
            return False
        if self.in_flight == 0:
            return True
        if time.monotonic() - self.started >= self.grace_s:
            if not self.abort.is_set():
                logger.warning("shutdown grace of %g s is over; answering %d in-flight request(s) 503",
                               self.grace_s, self.in_flight)
                self.abort.set()
            return time.monotonic() - self.started >= self.grace_s + 2.0
        return False

    @staticmethod
    def error() -> QueueFullError:
        return QueueFullError("the daemon is shutting down; retry later", retry_after=_DRAIN_RETRY_AFTER_S)

    async def run(self, invocation: Any) -> Response:
        """Run one invocation (a coroutine) unless the daemon drains; answer it 503 if the grace runs out."""
        self.in_flight += 1
        try:
            task = asyncio.ensure_future(invocation)
            aborted = asyncio.ensure_future(self.abort.wait())
            try:
                await asyncio.wait({task, aborted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                aborted.cancel()
            if task.done():
                return task.result()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise self.error()
        finally:
            self.in_flight -= 1


class DaemonState(TypedDict):
    settings: Settings
    manager: EndpointManager
    metrics: DaemonMetrics
    jobs: AsyncJobs
    auth: bool
    key_auth: bool


def _is_runtime(request: Request) -> bool:
    return request.url.path.startswith("/endpoints/")


def _is_control_plane(request: Request) -> bool:
    return request.url.path == "/" and "x-amz-target" in request.headers


async def _guard(request: Request) -> None:
    """Body limit and authentication for every route but ``/ping``, the web UI's static files, OpenAI image
    URLs (capability URLs) and model artifacts (authenticated by their own route, on loopback too: see
    :mod:`._artifact_api`) (logged when refused)."""
    path = request.url.path
    if path == "/ping" or is_public_path(path, request.method) or path.startswith((FILES_PREFIX,
                                                                                   "/sdmaker/v1/artifacts/")):
        return
    settings: Settings = request.state.settings
    body = await read_body(request, settings.max_body_bytes)
    # the local key guards the control plane (it deploys code) even where nothing else is checked
    if not (request.state.auth or (request.state.key_auth and request.url.path == "/")):
        return
    headers: dict[str, list[str]] = {}
    for key, value in request.headers.raw:
        headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    try:
        who = verify_request(settings, method=request.method, path=request.scope.get("raw_path", b"/").decode(
            "latin-1").split("?")[0], query=request.scope.get("query_string", b"").decode("latin-1"),
            headers=headers, body=body)
    except AuthenticationError as exc:
        client = request.client.host if request.client else "?"
        logger.warning("refused unauthenticated request %s %s from %s: %s", request.method, request.url.path,
                       client, exc.message)
        raise
    logger.debug("authenticated %s %s as %s", request.method, request.url.path, who)


def create_app(settings: Settings, *, host: str | None = None, port: int | None = None) -> FastAPI:
    """Build the daemon app for ``settings``; ``host``/``port`` are the bind address (they decide whether auth
    is required and which ``Host`` headers are answered). With ``settings.local_key`` the key is created here
    (first start).

    Raises:
        ConfigError: a non-loopback ``host`` (or ``require_auth``) without configured credentials.
    """
    host = host or settings.daemon_host
    if settings.local_key:
        from sdmaker.local_key import ensure_local_key

        ensure_local_key(settings.home)
        settings = with_local_key(settings)
        settings = replace(settings, auth_token=settings.auth_token or settings.local_token)
    check_bind(settings, host)
    # the daemon's own S3 clients (s3:// model data) reach the built-in S3 at the address it binds
    settings = replace(settings, daemon_host=host, daemon_port=port or settings.daemon_port, daemon_url=None)
    need_auth = auth_required(settings, host)
    key_auth = settings.local_key
    drain = Drain()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[DaemonState]:
        manager = EndpointManager(settings)
        metrics = DaemonMetrics()
        metrics.set_queue_depth_source(lambda: {n: (rt.queue_depth, rt.expected_wait_s)
                                                 for n, rt in manager.live.items()})
        metrics.set_model_cache_source(lambda: {n: rt.pool.stats for n, rt in manager.live.items()
                                                 if isinstance(rt.pool, MultiModelPool)})
        await manager.start()
        jobs = AsyncJobs(settings, manager, draining=lambda: drain.draining)
        await jobs.start()
        metrics.set_backlog_source(lambda: {**dict.fromkeys(manager.live, (0, 0.0)), **jobs.backlog()})
        input_shape("CreateModel")  # load botocore's SageMaker model now, not in the first control-plane call
        logger.info("sdmaker daemon ready (home %s, auth %s)", settings.home, "on" if need_auth else "off")
        try:
            yield {"settings": settings, "manager": manager, "metrics": metrics, "auth": need_auth,
                   "key_auth": key_auth, "jobs": jobs}
        finally:
            await jobs.close()  # running async jobs finish or go back to the queue, before the workers stop
            await manager.close()

    app = FastAPI(title="sdmaker daemon", version=__version__, lifespan=lifespan, dependencies=[Depends(_guard)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.drain = drain
    app.add_middleware(HostGuard, policy=HostPolicy(host, port or settings.daemon_port, settings.allowed_hosts))
    if settings.s3_builtin:  # S3 under /s3 on this port (sdmaker.serving.s3); it checks the same credentials
        app.state.s3 = mount_s3(app, settings, auth=need_auth, verify=verify_request)

    @app.exception_handler(SdmakerError)
    async def _on_error(request: Request, exc: SdmakerError) -> Response:
        if is_openai_path(request.url.path):
            return openai_error_response(exc)
        if _is_runtime(request):
            name = request.url.path.split("/")[2] if request.url.path.count("/") >= 2 else None
            return runtime_error_response(exc, settings, name)
        if _is_control_plane(request):
            status = 403 if exc.http_status == 403 else 500 if exc.http_status >= 500 else 400
            code = {403: "InvalidSignatureException", 500: "InternalFailure"}.get(status, "ValidationException")
            return control_plane_error(code, exc.message, status, error_code=exc.code)
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers={ERROR_CODE_HEADER: exc.code})

    # Every error answer carries X-Sdmaker-Error-Code, including the framework's own and a crash's.
    @app.exception_handler(HTTPException)
    async def _on_http_error(request: Request, exc: HTTPException) -> Response:
        if is_openai_path(request.url.path):  # an unknown /v1 route or method, in OpenAI's error shape
            return JSONResponse({"error": {"message": f"Invalid URL ({request.method} {request.url.path})",
                                           "type": "invalid_request_error", "param": None, "code": None}},
                                status_code=exc.status_code, headers={ERROR_CODE_HEADER: "InvalidRequestError"})
        response = await http_exception_handler(request, exc)
        response.headers[ERROR_CODE_HEADER] = "InvalidRequestError" if exc.status_code < 500 else "ServingError"
        return response

    @app.exception_handler(RequestValidationError)
    async def _on_bad_parameter(request: Request, exc: RequestValidationError) -> Response:
        response = await request_validation_exception_handler(request, exc)
        response.headers[ERROR_CODE_HEADER] = "InvalidRequestError"
        return response

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception) -> Response:  # starlette logs and re-raises it
        return await _on_error(request, ServingError("An internal failure occurred."))

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"status": "Healthy", "version": __version__}

    @app.post("/")
    async def sagemaker_control_plane(request: Request) -> Response:
        raw = await read_body(request, settings.max_body_bytes)
        try:
            body = json.loads(raw or b"{}")
        except RecursionError:
            return control_plane_error("SerializationException", "request body is nested too deeply")
        except ValueError:  # includes UnicodeDecodeError: JSON 1.1 bodies are UTF-8
            return control_plane_error("SerializationException", "request body is not valid JSON")
        if not isinstance(body, dict):
            return control_plane_error("SerializationException", "request body must be a JSON object")
        if request.headers.get("x-amz-target", "").startswith(AUTOSCALING_TARGET):
            return await autoscaling_api(request, body)  # application-autoscaling, same port and auth
        return await control_plane(request, body)

    @app.post("/endpoints/{name}/invocations")
    async def sagemaker_invoke(request: Request, name: str) -> Response:
        if drain.draining:
            return runtime_error_response(drain.error(), settings, name)
        return await drain.run(invoke_endpoint(request, name))

    @app.post("/endpoints/{name}/invocations-response-stream")
    async def sagemaker_invoke_stream(request: Request, name: str) -> Response:
        if drain.draining:
            return runtime_error_response(drain.error(), settings, name)
        return await invoke_endpoint_stream(request, name)

    @app.get("/sdmaker/v1/jobs/{job_id}/events")
    async def job_events_sse(request: Request, job_id: str) -> Response:
        """A job's progress as Server-Sent Events (:mod:`._progress`), with ``Last-Event-ID`` resume."""
        manager: EndpointManager = request.state.manager
        return await job_events(request, job_id, manager.events)

    @app.post("/endpoints/{name}/async-invocations", status_code=202)
    async def sagemaker_invoke_async(request: Request, name: str) -> Response:
        if drain.draining:
            return runtime_error_response(drain.error(), settings, name)
        return await invoke_endpoint_async(request, name)

    @app.get("/sdmaker/v1/jobs")
    async def list_jobs(request: Request, endpoint: str | None = None, state: str | None = None,
                        limit: int = 100) -> dict[str, Any]:
        """Asynchronous inference jobs, newest first (filters: endpoint, state)."""
        return {"jobs": request.state.jobs.jobs(endpoint=endpoint, state=state, limit=limit)}

    @app.get("/sdmaker/v1/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> dict[str, Any]:
        """One job: state, queue position, step i of n, timestamps, output and failure locations."""
        return dict(request.state.jobs.job(job_id))

    @app.post("/sdmaker/v1/jobs/{job_id}/cancel")
    async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        return dict(await request.state.jobs.cancel(job_id))

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        return Response(request.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/sdmaker/v1/endpoints")
    async def list_details(request: Request) -> dict[str, Any]:
        manager: EndpointManager = request.state.manager
        return {"endpoints": [{**manager.details(r.name), **request.state.jobs.backlog_of(r.name)}
                              for r in manager.db.endpoints()]}

    @app.get("/sdmaker/v1/standby")
    async def standby(request: Request) -> dict[str, Any]:
        """The warm standby workers (``SDMAKER_STANDBY_WORKERS``): how many are kept, ready, used."""
        manager: EndpointManager = request.state.manager
        return manager.standbys.describe()

    @app.get("/sdmaker/v1/endpoints/{name}")
    async def details(request: Request, name: str) -> dict[str, Any]:
        manager: EndpointManager = request.state.manager
        return {**manager.details(name), **request.state.jobs.backlog_of(name)}

    @app.get("/sdmaker/v1/artifacts/{digest}")
    async def artifact(request: Request, digest: str) -> Response:
        return await artifact_response(request, digest)

    @app.get("/sdmaker/v1/endpoints/{name}/logs")
    async def logs(request: Request, name: str, offset: int = 0) -> dict[str, Any]:
        """Worker and lifecycle log of an endpoint from byte ``offset`` (``-1``: the last 8 KiB).

        An ``offset`` past the end means the log was rotated since the caller read it: it reads from the start.
        """
        manager: EndpointManager = request.state.manager
        if manager.db.endpoint(name) is None and not manager.log_file(name).exists():
            raise EndpointNotFoundError(f"endpoint {name} not found", endpoint=name)
        path = manager.log_file(name)
        if not path.exists():
            return {"text": "", "offset": 0}
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            start = max(0, size - 8192) if offset < 0 else (offset if offset <= size else 0)
            fh.seek(start)
            data = fh.read(_LOG_CHUNK)
        return {"text": data.decode("utf-8", errors="replace"), "offset": start + len(data)}

    add_openai_routes(app, drain)
    add_ui_routes(app)
    return app


def run_daemon(settings: Settings, *, host: str | None = None, port: int | None = None,
               log_level: str = "info") -> None:
    """Serve the daemon in the foreground until SIGTERM/SIGINT (the ``sdmaker up`` entry point); drains first."""
    import uvicorn

    host = host or settings.daemon_host
    port = port or settings.daemon_port
    app = create_app(settings, host=host, port=port)
    drain: Drain = app.state.drain

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if drain.draining:  # a second signal: stop now
                super().handle_exit(sig, frame)
                return
            drain.begin()  # new invocations get 503 from now on; on_tick stops once in-flight ones are done

        async def on_tick(self, counter: int) -> bool:
            return await super().on_tick(counter) or drain.done()

    # The worker processes read no stdin; the lifespan's shutdown stops them (5 s grace each, in parallel).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = _DrainingServer(config)
    # uvicorn re-raises the signal it stopped for once its own handlers are gone: a no-op handler meanwhile
    # turns that into a normal return, so the caller's cleanup (the pid file) runs.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
