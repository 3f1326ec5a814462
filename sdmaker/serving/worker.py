"""Worker process entry point: ``python -m sdmaker.serving.worker --model-dir DIR --port PORT ...``.

One worker = one model loaded once (``model_fn`` or the default) behind the SageMaker container
contract (``GET /ping``, ``POST /invocations``). The daemon spawns N of these per endpoint and proxies to
them; ``sdmaker serve`` runs the same server in the foreground.

Options::

    --model-dir DIR          extracted model folder (contains model_index.json and/or code/inference.py)
    --port PORT              default: SAGEMAKER_BIND_TO_PORT, else 8080
    --host HOST              default 127.0.0.1; any other address needs --token
    --status-file PATH       JSON {"state": "loading"|"ready"|"failed", "error": str|null, "pid": int,
                             "load_seconds": float|null, "worker_id": str|null, "model_dir": str, "time": float},
                             rewritten atomically on every state change
    --workers-id ID          label for logs and the status file
    --max-body-bytes N       413 above this (default SDMAKER_MAX_BODY_BYTES, else 6291456)
    --device auto|cpu|cuda   --dtype auto|fp32|bf16|fp16   (default model load only; default: settings)
    --threads N              handler threads (default 1)
    --max-batch N            batch up to N images per UNet step across concurrent requests (default 0 = off;
                             raises --threads to at least N so N requests can be in flight)
    --model-name NAME        display name (default: sdmaker.json "name", else the folder name)
    --model-digest DIGEST    content digest when known (skips hashing the weights at load)
    --token TOKEN            require "Authorization: Bearer TOKEN" on every route but /ping
    --allow-pickle           let the default loader read .bin/.ckpt weights
    --fail-grace-seconds S   after a failed load, keep answering /ping 500 for S seconds, then exit 3

``python -m sdmaker.serving.worker --standby`` starts a warm standby instead: it imports torch and
diffusers, then waits on stdin for the arguments above (see :mod:`sdmaker.serving._standby`).

Environment (``SAGEMAKER_PROGRAM`` etc.) is read through :mod:`sdmaker.config`.
Exit codes: 0 stopped (SIGTERM/SIGINT), 2 bad arguments, 3 model load failed, 4 port unavailable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from sdmaker import __version__
from sdmaker.config import Settings, load_settings
from sdmaker.errors import SdmakerError
from sdmaker.serving._container import ModelServer, run_server
from sdmaker.serving._handler import HandlerService

__all__ = ["build_parser", "main", "run"]

logger = logging.getLogger("sdmaker.serving.worker")


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdmaker.serving.worker",
                                description="sdmaker model server worker (SageMaker container contract)")
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--port", type=int, default=settings.bind_port)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--status-file", type=Path, default=None)
    p.add_argument("--workers-id", "--worker-id", dest="worker_id", default=None)
    p.add_argument("--max-body-bytes", type=int, default=settings.max_body_bytes)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=settings.device)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default=settings.dtype)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=0)
    p.add_argument("--model-name", default=None)
    p.add_argument("--model-digest", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--fail-grace-seconds", type=float, default=2.0)
    return p


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve with parsed ``args`` until stopped; the exit code (see the module docstring)."""
    handler = HandlerService(args.model_dir, program=settings.sagemaker_program, device=args.device,
                             dtype=args.dtype, model_name=args.model_name,
                             allow_pickle=args.allow_pickle, server_version=__version__, digest=args.model_digest,
                             max_batch=max(args.max_batch, 0))
    server = ModelServer(handler, status_file=args.status_file, threads=max(args.threads, args.max_batch),
                         max_body_bytes=args.max_body_bytes, token=args.token or settings.worker_token,
                         worker_id=args.worker_id)
    return run_server(server, host=args.host, port=args.port, fail_grace_s=args.fail_grace_seconds,
                      allowed_hosts=settings.allowed_hosts)


def main(argv: list[str] | None = None, *, standby: dict[str, Any] | None = None) -> int:
    """Parse ``argv`` and serve; ``standby`` describes the warm standby this process was (logged)."""
    if (sys.argv[1:] if argv is None else argv)[:1] == ["--standby"]:
        from sdmaker.serving._standby import serve_standby

        return serve_standby()
    try:
        settings = load_settings()
    except SdmakerError as exc:
        print(f"sdmaker worker: {exc.message}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    tag = f"worker {args.worker_id}" if args.worker_id else "worker"
    logging.basicConfig(level=logging.DEBUG if settings.debug else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{tag}] %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if standby:
        logger.info("started from warm standby pid %s (imports took %.1f s before the assignment)",
                    standby.get("pid"), float(standby.get("import_seconds") or 0.0))
    try:
        return run(args, settings)
    except SdmakerError as exc:
        logger.error("%s", exc.message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
