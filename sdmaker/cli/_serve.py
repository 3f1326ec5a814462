"""``sdmaker serve MODEL``: one model behind the SageMaker container contract, in the foreground.

The same server the daemon's workers run (``GET /ping``, ``POST /invocations``, ``code/inference.py``
hooks), without the daemon: handy to try an artifact exactly as SageMaker would host it, or to put
``requests`` / SageMaker local-mode style clients in front of it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from sdmaker.cli._common import console, get_settings, setup_logging
from sdmaker.config import export_engine
from sdmaker.errors import AuthenticationError

__all__ = ["register"]


def serve_cmd(
    model: Annotated[str, typer.Argument(help="Store name, model folder or model.tar.gz (default: built-in mini).")]
    = "mini",
    port: Annotated[int | None, typer.Option(help="Port (default: SAGEMAKER_BIND_TO_PORT, else 8080).")] = None,
    host: Annotated[str, typer.Option(help="Address; anything but loopback needs --token.")] = "127.0.0.1",
    token: Annotated[str | None, typer.Option(
        help="Require 'Authorization: Bearer TOKEN' on /invocations (default: SDMAKER_API_TOKEN).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default model loader only).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16 (default model loader only).")] = None,
    threads: Annotated[int, typer.Option(help="Handler threads (concurrent requests reaching the model).")] = 1,
    max_body_bytes: Annotated[int | None, typer.Option(help="413 above this many bytes (default 6 MiB).")] = None,
    install: Annotated[bool, typer.Option(
        "--install/--no-install",
        help="Install code/requirements.txt packages that are missing into an isolated per-model env.")] = True,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.ckpt weights.")] = False,
    engine: Annotated[str | None, typer.Option(help=(
        "Backend of compiled UNet passes (SDMAKER_ENGINE: auto, torch or openvino; default auto: OpenVINO on "
        "AVX512-BF16 CPUs, AMX or not; torch's AOTInductor elsewhere)."))] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve MODEL on /ping and /invocations until Ctrl-C (exit 3 when the model fails to load)."""
    from sdmaker.serving import is_loopback

    settings = get_settings()
    token = token or settings.auth_token
    if not is_loopback(host) and not token:  # refuse before touching the model
        raise AuthenticationError(f"refusing to listen on {host} without credentials: pass --token (or set "
                                  "SDMAKER_API_TOKEN); clients then send 'Authorization: Bearer <token>'")
    port = port or settings.bind_port
    max_body = max_body_bytes or settings.max_body_bytes
    if engine is not None:
        export_engine(engine)

    from sdmaker.serving import WorkerConfig, prepare_model_environment
    from sdmaker.store import resolve_model

    resolved = resolve_model(model, settings, allow_pickle=allow_pickle)
    python = prepare_model_environment(resolved.path, settings, allow_install=install)
    config = WorkerConfig(model_dir=resolved.path, port=port, host=host, max_body_bytes=max_body, threads=threads,
                          model_name=resolved.name, model_digest=resolved.digest, device=device or settings.device,
                          dtype=dtype or settings.dtype, fail_grace_s=0.5, token=token, allow_pickle=allow_pickle)
    scheme_host = f"http://{host}:{port}"
    console.print(f"serving {resolved.name} at {scheme_host} (GET /ping, POST /invocations); Ctrl-C stops",
                  highlight=False)
    if python != sys.executable:  # code/requirements.txt needed packages: run in the model's own env
        console.print(f"using the model's environment {python}", highlight=False)
        sys.stdout.flush()
        read, write = os.pipe()  # the worker reads its configuration on stdin, as the daemon's workers do
        os.write(write, config.to_line())
        os.close(write)
        os.dup2(read, 0)
        os.close(read)
        os.execv(python, [python, "-m", "sdmaker.serving.container"])

    from sdmaker.serving import serve_worker

    setup_logging(verbose)
    logging.getLogger("sdmaker").setLevel(logging.DEBUG if verbose else logging.INFO)
    code = serve_worker(config, settings)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
