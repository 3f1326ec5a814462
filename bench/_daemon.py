"""The daemon as the benchmarks drive it: ``python -m sdmaker up`` on a free loopback port with its own
``SDMAKER_HOME``, reached over HTTP only (one harness for ``bench.deploy`` and ``bench.reliability``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["BenchDaemon", "free_port"]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchDaemon:
    """A daemon process started for one benchmark, stopped with SIGTERM (then SIGKILL) by :meth:`stop`."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        import httpx

        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SDMAKER_HOME": str(home), "SDMAKER_PORT": str(self.port), "HF_HUB_OFFLINE": "1",
                    "SDMAKER_URL": self.url, **(env or {})}
        self.log = open(home / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "up", "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/ping", timeout=1).status_code == 200:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start; see {home / 'daemon.log'}")
            time.sleep(0.1)

    def wait_standby(self, timeout_s: float = 300.0) -> bool:
        """Wait until a warm standby worker is ready (endpoints then start in about a second); False when the
        daemon keeps none or none became ready in time."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = httpx.get(self.url + "/sdmaker/v1/standby", timeout=10).json()
            if not info.get("count"):
                return False
            if any(s.get("state") == "ready" for s in info.get("standbys", [])):
                return True
            time.sleep(0.2)
        return False

    def client(self, service: str) -> Any:
        """A boto3 client of ``service`` pointed at this daemon (no retries: a bench counts every answer)."""
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="bench",
                            aws_secret_access_key="bench",
                            config=Config(read_timeout=900, retries={"max_attempts": 1}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
