"""Starting worker processes: the one place that knows the worker's command line.

Fresh workers and warm standbys are the same program (``python -m sdmaker.serving.container``); both get
their :class:`~sdmaker.serving._protocol.WorkerConfig` on stdin and die with the daemon.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["WORKER_MODULE", "die_with_parent", "free_port", "spawn_worker_process"]

#: ``python -m`` target of every worker process.
WORKER_MODULE = "sdmaker.serving.container"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the worker binds it right after; a lost race means a restart)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the worker when the daemon dies, so a killed daemon leaves no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def spawn_worker_process(python: str, *, env: Mapping[str, str], standby: bool,
                               stdout: IO[Any] | int, stderr: IO[Any] | int) -> asyncio.subprocess.Process:
    """Start ``python -m sdmaker.serving.container`` (``--standby``: import first) with stdin a pipe.

    The caller writes the worker's configuration line to ``proc.stdin`` (at once, or when a standby is
    assigned).
    """
    args = [python, "-m", WORKER_MODULE, *(["--standby"] if standby else [])]
    return await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=stdout, stderr=stderr, env=dict(env),
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
