"""The SageMaker inference container: ``GET /ping``, ``POST /invocations`` (and batch transform's
``GET /execution-parameters``) over one loaded model.

Contract §1.3-1.4 and §7: the port is bound before any model work starts; the model loads in a
background thread while ``/ping`` answers 503 ``{"status": "Loading"}``, then 200 ``{"status":
"Healthy"}``, or 500 ``{"status": "Failed", "error": ...}`` with the model code's own error. Handlers
run in a thread pool so ``/ping`` stays responsive during generation and concurrent requests can reach
a step-level batcher. A status file (JSON, written atomically) tells a supervising daemon the same.

Both ``sdmaker serve`` (foreground) and ``python -m sdmaker.serving.container`` (spawned by the daemon)
run :func:`run_server`. (No ``from __future__ import annotations`` here: FastAPI must resolve the route
annotations, imported inside :func:`create_app`.)
"""

import asyncio
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmaker.errors import AuthenticationError, ConfigError, PayloadTooLargeError
from sdmaker.files import atomic_write_json
from sdmaker.serving._hosts import HostGuard, HostPolicy
from sdmaker.serving._http import is_loopback, read_body
from sdmaker.serving._protocol import (
    EXIT_BIND_FAILED,
    EXIT_LOAD_FAILED,
    FRAMES_MEDIA_TYPE,
    PROGRESS_HEADER,
    ServerState,
    encode_frame,
)
from sdmaker.serving._worker_secret import token_matches
from sdmaker.serving.container._handler import HandlerService, ProgressSink, error_body

__all__ = ["DEFAULT_MAX_BODY_BYTES", "EXIT_BIND_FAILED", "EXIT_LOAD_FAILED", "ModelServer", "create_app",
           "run_server", "write_status"]

logger = logging.getLogger(__name__)

#: SageMaker's real-time body limit (runtime model ``BodyBlob.max``).
DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024
_NOT_FOUND = "Requested resource is not found, please refer to API document."


def write_status(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


@dataclass(frozen=True)
class _State:
    state: ServerState = ServerState.LOADING
    error: str | None = None
    load_seconds: float | None = None


class ModelServer:
    """One model, its load state, and the pool handlers run in.

    Args:
        handler: the (not yet loaded) handler service.
        status_file: where to mirror the state for a supervising daemon (optional).
        threads: handler threads (default 1: one generation at a time per worker).
        max_body_bytes: larger bodies get 413 before the handler runs.
        token: when set, every route but ``/ping`` requires ``Authorization: Bearer <token>``.
        worker_id: shown in logs and the status file.
    """

    def __init__(self, handler: HandlerService, *, status_file: Path | None = None, threads: int = 1,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, token: str | None = None,
                 worker_id: str | None = None) -> None:
        if threads < 1:
            raise ConfigError(f"threads={threads} must be >= 1", field="threads", value=threads)
        self.handler = handler
        self.status_file = Path(status_file) if status_file else None
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.worker_id = worker_id
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdmaker-handler")
        self._state = _State()
        self._lock = threading.Lock()
        self.loaded = threading.Event()  # set when loading ended, either way
        self._write_status()

    @property
    def state(self) -> ServerState:
        return self._state.state

    @property
    def error(self) -> str | None:
        return self._state.error

    def _write_status(self, s: "_State | None" = None) -> None:
        if self.status_file is None:
            return
        s = s or self._state
        write_status(self.status_file, {"state": s.state.value, "error": s.error, "pid": os.getpid(),
                                        "load_seconds": s.load_seconds, "worker_id": self.worker_id,
                                        "model_dir": str(self.handler.model_dir), "time": time.time()})

    def load(self) -> bool:
        """Load the model (blocking); record ready/failed. Returns True on success."""
        started = time.perf_counter()
        try:
            self.handler.load()
        except BaseException as exc:  # noqa: BLE001 - the model's own error, whatever it is
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            logger.error("model load failed: %s", text, exc_info=exc)
            self.fail(text, time.perf_counter() - started)
            self.loaded.set()
            return False
        self._become(_State(ServerState.READY, None, time.perf_counter() - started))
        logger.info("model loaded in %.2f s; ready", self._state.load_seconds)
        self.loaded.set()
        return True

    def fail(self, error: str, load_seconds: float | None = None) -> None:
        """Record that this server cannot serve (model load or bind failed); ``/ping`` answers 500 from now on."""
        self._become(_State(ServerState.FAILED, error, load_seconds))

    def _become(self, state: _State) -> None:
        # The file first, then the state that /ping reads: a supervisor that sees the worker Healthy
        # must find the same state in the status file, never the previous one.
        with self._lock:
            self._write_status(state)
            self._state = state

    def start_loading(self) -> threading.Thread:
        """Load in a daemon thread (a hung ``model_fn`` must not keep the process alive at shutdown)."""
        thread = threading.Thread(target=self.load, name="sdmaker-model-load", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _json(status: int, payload: dict[str, Any]) -> Any:
    from starlette.responses import Response

    return Response(content=json.dumps(payload), status_code=status, media_type="application/json")


def _raw_error(status: int, message: str, type_: str, **extra: Any) -> Any:
    from starlette.responses import Response

    return Response(content=error_body(status, message, type_=type_, extra=extra), status_code=status,
                    media_type="application/json")


def create_app(server: ModelServer, policy: HostPolicy | None = None) -> Any:
    """The FastAPI app of the container contract for ``server``; ``policy``: the ``Host`` values it answers
    (default: loopback names, any port)."""
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response

    app = FastAPI(title="sdmaker model server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    async def _auth(request: Request, call_next: Any) -> Any:
        if (server.token and request.url.path != "/ping"
                and not token_matches(request.headers.get("authorization", ""), server.token)):
            client = request.client.host if request.client else "?"
            logger.warning("refused %s %s from %s: missing or invalid bearer token", request.method,
                           request.url.path, client)
            err = AuthenticationError("missing or invalid bearer token (send Authorization: Bearer <token>)")
            return _raw_error(403, err.message, "AccessDeniedException", error=err.code)
        return await call_next(request)

    if server.token:  # a daemon's worker (per-worker secret) or ``sdmaker serve --token``
        app.middleware("http")(_auth)
    app.add_middleware(HostGuard, policy=policy or HostPolicy("127.0.0.1"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code == 404:
            return _raw_error(404, _NOT_FOUND, "ResourceNotFoundException")
        return _raw_error(exc.status_code, str(exc.detail), "BadRequestException")

    @app.get("/ping")
    async def ping() -> Any:
        state = server.state
        if state is ServerState.READY:
            return _json(200, {"status": "Healthy"})
        if state is ServerState.FAILED:
            return _json(500, {"status": "Failed", "error": server.error})
        return _json(503, {"status": "Loading"})

    @app.get("/execution-parameters")
    async def execution_parameters() -> Any:
        """Batch transform's optional container route: the job's defaults for concurrency, strategy, payload."""
        if server.state is not ServerState.READY:
            return _raw_error(503, "model is not loaded", "ServiceUnavailableException")
        params = server.handler.execution_parameters()
        if params is None:
            return _raw_error(404, _NOT_FOUND, "ResourceNotFoundException")
        return _json(200, params)

    @app.post("/invocations")
    async def invocations(request: Request) -> Any:
        try:
            body = await read_body(request, server.max_body_bytes)
        except PayloadTooLargeError as exc:
            return _too_large(int(exc.fields["size"]), int(exc.fields["limit"]))
        if server.state is not ServerState.READY:
            message = ("model is still loading" if server.state is ServerState.LOADING
                       else f"model failed to load: {server.error}")
            return _raw_error(503, message, "ServiceUnavailableException")
        headers = dict(request.headers.items())
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if headers.get(PROGRESS_HEADER.lower()) == "frames":
            return _framed_answer(server, body, headers, loop, started)
        reply = await loop.run_in_executor(server.executor, server.handler.handle, body, headers)
        logger.info("POST /invocations %d %d bytes in %.3f s", reply.status, len(reply.body),
                    time.perf_counter() - started)
        out_headers = dict(reply.headers)
        out_headers["Content-Type"] = reply.content_type
        return Response(content=reply.body, status_code=reply.status, headers=out_headers)

    return app


def _framed_answer(server: ModelServer, body: bytes, headers: dict[str, str], loop: asyncio.AbstractEventLoop,
                   started: float) -> Any:
    """The answer as frames (:func:`~sdmaker.serving._protocol.encode_frame`), streamed while the request runs.

    Progress events and streamed chunks are framed in the handler's thread and handed to the loop; the reply
    frame (status, headers, body) comes last. The HTTP status is 200 whatever the reply's is: it is in the frame.
    """
    from starlette.responses import StreamingResponse

    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(frame: bytes) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, frame)

    sink = ProgressSink(event=lambda type_, data: put(encode_frame({"kind": "event", "type": type_, "data": data})),
                        chunk=lambda data: put(encode_frame({"kind": "chunk"}, data)))

    def run() -> None:
        try:
            reply = server.handler.handle(body, headers, sink)
            logger.info("POST /invocations %d %d bytes in %.3f s (framed)", reply.status, len(reply.body),
                        time.perf_counter() - started)
            put(encode_frame({"kind": "reply", "status": reply.status, "content_type": reply.content_type,
                              "headers": dict(reply.headers), "streamed": reply.streamed}, reply.body))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    future = loop.run_in_executor(server.executor, run)

    async def frames() -> Any:
        while True:
            frame = await queue.get()
            if frame is None:
                break
            yield frame
        await future

    return StreamingResponse(frames(), status_code=200, media_type=FRAMES_MEDIA_TYPE)


def _too_large(size: int, limit: int) -> Any:
    return _raw_error(413, f"request body of {size} bytes exceeds the limit of {limit} bytes", "PayloadTooLarge",
                      error="PayloadTooLargeError", limit=limit)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(server: ModelServer, *, host: str, port: int, fail_grace_s: float = 2.0,
               graceful_shutdown_s: float = 30.0, allowed_hosts: tuple[str, ...] = ()) -> int:
    """Bind ``host:port`` now, load in the background, serve until stopped; return the exit code.

    0 after a normal stop (SIGTERM/SIGINT), :data:`EXIT_LOAD_FAILED` ``fail_grace_s`` seconds after a
    failed load (``/ping`` and the status file carry the error meanwhile), :data:`EXIT_BIND_FAILED` when
    the port cannot be bound.
    """
    import uvicorn

    if not is_loopback(host) and not server.token:
        raise AuthenticationError(f"refusing to listen on {host}: a non-loopback address needs a bearer token "
                                  "(--token); the default 127.0.0.1 needs none")
    try:
        sock = _bind(host, port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", host, port, exc)
        server.fail(f"cannot listen on {host}:{port}: {exc}")
        return EXIT_BIND_FAILED
    logger.info("listening on http://%s:%d (pid %d)", host, port, os.getpid())
    config = uvicorn.Config(create_app(server, HostPolicy(host, port, allowed_hosts)), log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=math.ceil(graceful_shutdown_s))
    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # stop generations at their next step boundary, so the graceful shutdown does not wait for them
            # (off the signal handler: cancelling takes the batcher's lock)
            threading.Thread(target=server.handler.stop, name="sdmaker-stop", daemon=True).start()
            super().handle_exit(sig, frame)

    uv = _Server(config)
    exit_code = 0

    def _watch_load() -> None:
        nonlocal exit_code
        server.loaded.wait()
        if server.state is ServerState.FAILED:
            time.sleep(fail_grace_s)  # let the daemon read /ping or the status file
            exit_code = EXIT_LOAD_FAILED
            uv.should_exit = True

    server.start_loading()
    threading.Thread(target=_watch_load, name="sdmaker-load-watch", daemon=True).start()
    # uvicorn handles SIGTERM/SIGINT gracefully, then re-raises the signal once its own handlers are gone;
    # a no-op handler meanwhile turns that into a plain exit 0 instead of death by signal.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        uv.run(sockets=[sock])
    finally:
        sock.close()
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped (exit code %d)", exit_code)
    return exit_code
