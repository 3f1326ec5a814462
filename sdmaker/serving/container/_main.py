"""Worker process entry point: ``python -m sdmaker.serving.container [--standby]``.

One worker = one model loaded once (``model_fn`` or the default) behind the SageMaker container
contract (``GET /ping``, ``POST /invocations``). The daemon spawns N of these per endpoint and proxies to
them; ``sdmaker serve`` runs the same server in the foreground (:func:`serve`).

The process reads ONE line on stdin: a :class:`~sdmaker.serving._protocol.WorkerConfig` as JSON (model
folder, port, device, dtype, batch size, limits, environment, log file...). With ``--standby`` it first
imports torch and diffusers and announces itself (:mod:`._standby`), so the same line turns a warm standby
into a worker; without it, the line is read at once. Either way the process then :func:`become`\\ s the
configured worker and serves.

Exit codes: 0 stopped (SIGTERM/SIGINT, or a standby whose stdin closed without work), 2 bad
configuration, 3 model load failed, 4 port unavailable.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time

from pydantic import ValidationError

from sdmaker import __version__
from sdmaker.config import Settings, load_settings, replace_environment
from sdmaker.errors import SdmakerError
from sdmaker.serving._protocol import EXIT_BAD_CONFIG, WorkerConfig, trusts_validation
from sdmaker.serving.container._handler import HandlerService
from sdmaker.serving.container._server import ModelServer, run_server
from sdmaker.serving.container._standby import announce_ready, preload

__all__ = ["become", "main", "serve"]

logger = logging.getLogger(__name__)


def become(config: WorkerConfig) -> None:
    """Make this process the configured worker: environment, output, stdin and torch threads.

    A fresh process was started with this environment and output already, so this changes nothing for
    it; a warm standby started with the standby's, and changes here.
    """
    if config.environment is not None:
        replace_environment(config.environment)
    if config.log_file is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        config.log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(config.log_file), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)  # a standby: closes our end of the daemon's stdout pipe, so the daemon sees EOF
        os.dup2(fd, 2)
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)  # the configuration was the only input
    os.dup2(null, 0)
    os.close(null)
    env = config.environment or {}
    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS") or ""
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def serve(config: WorkerConfig, settings: Settings) -> int:
    """Serve ``config``'s model until stopped; the exit code (see the module docstring)."""
    validated_by = functools.partial(trusts_validation, config) if config.trust_daemon_validation else None
    handler = HandlerService(config.model_dir, program=settings.sagemaker_program, device=config.device,
                             dtype=config.dtype, model_name=config.model_name, allow_pickle=config.allow_pickle,
                             server_version=__version__, digest=config.model_digest, max_batch=config.max_batch,
                             validated_by=validated_by)
    server = ModelServer(handler, status_file=config.status_file, threads=config.handler_threads,
                         max_body_bytes=config.max_body_bytes, token=config.token or settings.worker_token,
                         worker_id=config.worker_id)
    return run_server(server, host=config.host, port=config.port, fail_grace_s=config.fail_grace_s,
                      allowed_hosts=settings.allowed_hosts)


def _setup_logging(tag: str, debug: bool) -> None:
    for handler in list(logging.root.handlers):  # a standby logged with its own tag until now
        logging.root.removeHandler(handler)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{tag}] %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Read the worker configuration on stdin (after the imports, with ``--standby``) and serve it."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--standby"]):
        print("usage: python -m sdmaker.serving.container [--standby] < worker-config.json", file=sys.stderr)
        return EXIT_BAD_CONFIG
    standby = args == ["--standby"]
    import_s = 0.0
    if standby:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s [standby] %(name)s: %(message)s")
        import_s = preload()
        announce_ready(import_s)
    waited = time.perf_counter()
    line = sys.stdin.readline()
    if not line.strip():
        if standby:
            return 0  # the daemon closed our stdin without work: it is stopping
        print("sdmaker worker: expected a worker configuration (one JSON line) on stdin", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        config = WorkerConfig.from_line(line)
    except ValidationError as exc:
        print(f"sdmaker worker: invalid worker configuration: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    become(config)
    try:
        settings = load_settings()
    except SdmakerError as exc:
        print(f"sdmaker worker: {exc.message}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _setup_logging(f"worker {config.worker_id}" if config.worker_id else "worker", settings.debug)
    if standby:
        logger.info("started from warm standby pid %d (imports took %.1f s, waited %.1f s for the assignment)",
                    os.getpid(), import_s, time.perf_counter() - waited)
    try:
        return serve(config, settings)
    except SdmakerError as exc:
        logger.error("%s", exc.message)
        return EXIT_BAD_CONFIG
