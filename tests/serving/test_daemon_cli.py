"""The daemon from the shell: ``sdmaker up --detach`` / ``down``, ``env``, ``endpoint ...`` and ``invoke``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import _free_port
from PIL import Image
from typer.testing import CliRunner

from sdmaker.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def detached(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``sdmaker up --detach`` in its own SDMAKER_HOME; ``sdmaker down`` at the end (asserted)."""
    home = tmp_path_factory.mktemp("cli-home")
    port = _free_port()
    env = {**os.environ, "SDMAKER_HOME": str(home), "SDMAKER_PORT": str(port)}
    up = subprocess.run([sys.executable, "-m", "sdmaker", "up", "--detach"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stderr
    pid = json.loads((home / "daemon.pid").read_text())["pid"]
    assert f"http://127.0.0.1:{port}" in up.stdout
    again = subprocess.run([sys.executable, "-m", "sdmaker", "up", "--detach"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 1 and "already running" in again.stderr
    yield {"SDMAKER_HOME": str(home), "SDMAKER_PORT": str(port), "url": f"http://127.0.0.1:{port}", "pid": pid}
    down = subprocess.run([sys.executable, "-m", "sdmaker", "down"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 0 and f"pid {pid}" in down.stdout
    assert not (home / "daemon.pid").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2)


@pytest.fixture
def cli_env(detached: dict, monkeypatch: pytest.MonkeyPatch) -> dict:  # type: ignore[type-arg]
    monkeypatch.setenv("SDMAKER_HOME", detached["SDMAKER_HOME"])
    monkeypatch.setenv("SDMAKER_PORT", detached["SDMAKER_PORT"])
    monkeypatch.delenv("SDMAKER_URL", raising=False)
    return detached


def test_env_prints_exports_and_writes_the_sdk_config(cli_env: dict) -> None:  # type: ignore[type-arg]
    res = runner.invoke(app, ["env", "--bucket", "my-bucket"])
    assert res.exit_code == 0, res.output
    assert f"export AWS_ENDPOINT_URL_SAGEMAKER={cli_env['url']}" in res.output
    assert f"export AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME={cli_env['url']}" in res.output
    assert f"export AWS_ENDPOINT_URL_APPLICATION_AUTO_SCALING={cli_env['url']}" in res.output
    config = Path(cli_env["SDMAKER_HOME"]) / "sagemaker-config.yaml"
    assert f"export SAGEMAKER_USER_CONFIG_OVERRIDE={config}" in res.output
    assert "DefaultS3Bucket: my-bucket" in config.read_text()


@pytest.mark.slow
def test_endpoint_commands_and_invoke(cli_env: dict, sd1_dir: Path, scripted_model_dir: Path,  # type: ignore[type-arg]
                                      tmp_path: Path) -> None:
    res = runner.invoke(app, ["endpoint", "create", "cli-tiny", "--model", str(sd1_dir), "--timeout", "90"])
    assert res.exit_code == 0, res.output
    assert "cli-tiny: InService" in res.output

    res = runner.invoke(app, ["invoke", "cli-tiny", "-p", "a red circle", "--height", "64", "--width", "64",
                              "--steps", "2", "--seed", "3", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    written = [Path(line.strip()) for line in res.output.splitlines() if line.strip().endswith(".jpg")]
    assert len(written) == 1 and Image.open(written[0]).size == (64, 64)
    assert written[0].name == "cli-tiny-00-seed3.jpg"
    first = written[0].read_bytes()
    res = runner.invoke(app, ["invoke", "cli-tiny", "-p", "a red circle", "--height", "64", "--width", "64",
                              "--steps", "2", "--seed", "3", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    again = [Path(line.strip()) for line in res.output.splitlines() if line.strip().endswith(".jpg")]
    assert [p.name for p in again] == ["cli-tiny-00-seed3-2.jpg"]  # the first result was not overwritten
    assert written[0].read_bytes() == first

    res = runner.invoke(app, ["endpoint", "list"])
    assert res.exit_code == 0 and "cli-tiny" in res.output and "InService" in res.output
    res = runner.invoke(app, ["endpoint", "describe", "cli-tiny"])
    assert res.exit_code == 0, res.output
    for label in ("status", "model digest", "requests", "latency p50 / p95", "worker 0"):
        assert label in res.output
    res = runner.invoke(app, ["endpoint", "describe", "cli-tiny", "--json"])
    info = json.loads(res.output)
    assert info["invocations"] == 2 and info["timeout_s"] == 90 and info["model_digest"]
    res = runner.invoke(app, ["endpoint", "logs", "cli-tiny"])
    assert res.exit_code == 0 and "starting worker 0" in res.output

    res = runner.invoke(app, ["endpoint", "update", "cli-tiny", "--model", str(scripted_model_dir), "--workers", "2"])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["endpoint", "describe", "cli-tiny", "--json"]).output)
    assert len(info["workers"]) == 2 and info["status"] == "InService"

    res = runner.invoke(app, ["endpoint", "delete", "cli-tiny"])
    assert res.exit_code == 0 and "deleted cli-tiny" in res.output
    res = runner.invoke(app, ["endpoint", "describe", "cli-tiny"])
    assert res.exit_code == 1 and "not found" in res.output


def test_invoke_unknown_endpoint_is_one_line_error(cli_env: dict) -> None:  # type: ignore[type-arg]
    res = runner.invoke(app, ["invoke", "nope", "-p", "x"])
    assert res.exit_code == 1
    assert "Endpoint nope of account 000000000000 not found." in res.output


_PING_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Ping(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Ping).serve_forever()
"""


@pytest.fixture
def other_daemon():  # type: ignore[no-untyped-def]
    """Something else answering ``GET /ping`` with 200 on a loopback port (as another sdmaker daemon would)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _PING_SERVER, str(port)])
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None
                time.sleep(0.1)
        yield port, proc
    finally:
        proc.kill()
        proc.wait()


def test_up_detach_refuses_a_port_another_process_owns(other_daemon: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    port, _ = other_daemon
    home = tmp_path / "home"
    env = {**os.environ, "SDMAKER_HOME": str(home), "SDMAKER_PORT": str(port)}
    up = subprocess.run([sys.executable, "-m", "sdmaker", "up", "--detach"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 1, up.stdout + up.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in up.stderr
    assert "running at" not in up.stdout and not (home / "daemon.pid").exists()


def test_wait_up_wants_its_own_process_answering(other_daemon: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    from sdmaker.cli._endpoint import _wait_up
    from sdmaker.errors import ServingError

    port, server = other_daemon
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "daemon.log"
    log.write_text("ERROR: [Errno 98] address already in use\n")
    # a started "daemon" that never binds the port (as ours does when the port is taken) while another answers
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        with pytest.raises(ServingError, match="another process answers on"):
            _wait_up(url, impostor, log, port, timeout_s=60)
    finally:
        impostor.kill()
        impostor.wait()
    _wait_up(url, server, log, port, timeout_s=60)  # the process that does listen there passes
