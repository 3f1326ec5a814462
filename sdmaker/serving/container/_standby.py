"""The child side of a warm standby: import the heavy modules before an endpoint needs this process.

Why: a fresh worker spends 5-10 s (35 s on a loaded 2-core machine) importing torch, diffusers and
transformers before it reads an 11 MB model in a fraction of a second. A standby
(``python -m sdmaker.serving.container --standby``) does those imports ahead of time, prints one ready
line (:data:`~sdmaker.serving._protocol.READY_MARK` and a JSON object) on stdout and then waits for its
:class:`~sdmaker.serving._protocol.WorkerConfig`, exactly as a fresh worker does (see :mod:`._main`).
The daemon side (which standby may become which worker) is :mod:`sdmaker.serving.daemon._standby`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time

from sdmaker.serving._protocol import READY_MARK

__all__ = ["announce_ready", "preload"]

logger = logging.getLogger(__name__)

#: Imported by a standby before it waits (a missing optional one is skipped; the worker reports it later).
_PRELOAD = ("torch", "diffusers", "transformers", "sdmaker.engine", "sdmaker.serving.container._handler",
            "sdmaker.serving.container._server", "uvicorn", "fastapi", "starlette.responses",
            "uvicorn.protocols.http.h11_impl", "uvicorn.protocols.http.httptools_impl", "uvicorn.lifespan.off")
#: Lazily resolved attributes that a model load touches (diffusers/transformers import these on first use).
_PRELOAD_ATTRS = (("diffusers", "StableDiffusionPipeline"), ("diffusers", "AutoencoderKL"),
                  ("diffusers", "UNet2DConditionModel"), ("transformers", "CLIPTextModel"),
                  ("transformers", "CLIPTokenizer"), ("transformers", "BertModel"), ("transformers", "BertTokenizer"))


def preload() -> float:
    """Import what a model load needs; returns the seconds it took."""
    started = time.perf_counter()
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional extra; the worker itself reports real problems
            logger.debug("standby: could not preload %s: %s", name, exc)
    for module, attr in _PRELOAD_ATTRS:
        with contextlib.suppress(Exception):
            getattr(importlib.import_module(module), attr)
    return time.perf_counter() - started


def announce_ready(import_seconds: float) -> None:
    """Tell the daemon (our stdout is its pipe) that this standby can take a worker configuration."""
    print(f"{READY_MARK} {json.dumps({'pid': os.getpid(), 'import_seconds': round(import_seconds, 3)})}", flush=True)
