"""The container contract: /ping states, /invocations errors and limits, auth, the status file, real workers."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient

from sdmaker.serving import EXIT_LOAD_FAILED, HandlerService, ModelServer, WorkerConfig, create_app

FIXTURES = Path(__file__).parent / "fixtures"


def _server(name: str, **kwargs: object) -> ModelServer:
    return ModelServer(HandlerService(FIXTURES / name, device="cpu"), **kwargs)  # type: ignore[arg-type]


def test_ping_loading_then_healthy_and_status_file(tmp_path: Path) -> None:
    status = tmp_path / "run" / "w.status.json"
    server = _server("all_hooks", status_file=status, worker_id="ep-0")
    client = TestClient(create_app(server), base_url="http://127.0.0.1:8080")
    ping = client.get("/ping")
    assert (ping.status_code, ping.json()) == (503, {"status": "Loading"})
    loading = json.loads(status.read_text())
    assert loading["state"] == "loading" and loading["error"] is None and loading["worker_id"] == "ep-0"
    early = client.post("/invocations", json={"a": 1})
    assert early.status_code == 503 and early.json()["type"] == "ServiceUnavailableException"
    assert server.load()
    assert (client.get("/ping").status_code, client.get("/ping").json()) == (200, {"status": "Healthy"})
    ready = json.loads(status.read_text())
    assert ready["state"] == "ready" and isinstance(ready["load_seconds"], float) and ready["pid"] > 0
    assert list(status.parent.iterdir()) == [status]  # atomic writes leave no temp files behind


def test_failed_load_reports_the_model_error(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    server = _server("model_fn_raises", status_file=status)
    assert not server.load()
    ping = TestClient(create_app(server), base_url="http://127.0.0.1:8080").get("/ping")
    assert ping.status_code == 500
    assert ping.json() == {"status": "Failed",
                           "error": "RuntimeError: weights are corrupt: unet shard 3 of 4 is missing"}
    data = json.loads(status.read_text())
    assert data["state"] == "failed" and "unet shard 3 of 4 is missing" in data["error"]


@pytest.fixture(scope="module")
def hooks_client() -> TestClient:
    server = _server("all_hooks_context", max_body_bytes=64)
    assert server.load()
    return TestClient(create_app(server), base_url="http://127.0.0.1:8080")


def test_invocations_pass_raw_headers_and_answer_with_accept(hooks_client: TestClient) -> None:
    reply = hooks_client.post("/invocations", content=b'{"q": 1}', headers={
        "Content-Type": "application/json", "Accept": "application/vnd.custom+json",
        "X-Amzn-SageMaker-Custom-Attributes": "c1=v1"})
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/vnd.custom+json"
    assert reply.headers["x-amzn-sagemaker-custom-attributes"] == "echo=c1=v1"
    assert reply.json()["body"] == '{"q": 1}'  # the exact bytes sent


def test_body_over_the_limit_is_413_and_the_server_keeps_serving(hooks_client: TestClient) -> None:
    big = b"x" * 65
    reply = hooks_client.post("/invocations", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["error"] == "PayloadTooLargeError" and reply.json()["limit"] == 64
    chunked = hooks_client.post("/invocations", content=iter([b"x" * 40, b"x" * 40]),
                                headers={"Content-Type": "application/json"})  # no Content-Length: counted
    assert chunked.status_code == 413
    assert hooks_client.post("/invocations", json={"ok": 1}).status_code == 200


def test_unknown_route_is_mms_404(hooks_client: TestClient) -> None:
    reply = hooks_client.get("/models")
    assert reply.status_code == 404 and reply.json()["type"] == "ResourceNotFoundException"


def test_bearer_token_guards_everything_but_ping() -> None:
    server = _server("all_hooks", token="s3cret")
    assert server.load()
    client = TestClient(create_app(server), base_url="http://127.0.0.1:8080")
    assert client.get("/ping").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        reply = client.post("/invocations", json={"a": 1}, headers=headers)
        assert reply.status_code == 403 and reply.json()["error"] == "AuthenticationError"
    assert client.post("/invocations", json={"a": 1}, headers={"Authorization": "Bearer s3cret"}).status_code == 200


# --- real worker processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(model_dir: Path, port: int, status: Path, **extra: Any) -> subprocess.Popen[bytes]:
    """A worker process as the daemon starts one: its configuration is one JSON line on stdin."""
    config = WorkerConfig(model_dir=model_dir, port=port, status_file=status, worker_id="t-0", **extra)
    proc = subprocess.Popen([sys.executable, "-m", "sdmaker.serving.container"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(config.to_line())
    proc.stdin.close()
    return proc


def _first_answer(url: str, proc: subprocess.Popen[bytes], *, skip: tuple[int, ...] = ()) -> requests.Response:
    """Poll ``url`` until it answers with a status not in ``skip`` (a worker that exits fails the test)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        try:
            reply = requests.get(url, timeout=5)
            if reply.status_code not in skip:
                return reply
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} gave no answer")


@pytest.mark.slow
def test_worker_process_lifecycle(tmp_path: Path) -> None:
    model_dir = tmp_path / "gated"
    shutil.copytree(FIXTURES / "gated_load", model_dir)
    port, status = _free_port(), tmp_path / "status.json"
    proc = _spawn(model_dir, port, status, device="cpu", max_body_bytes=1000)
    base = f"http://127.0.0.1:{port}"
    try:
        loading = _first_answer(f"{base}/ping", proc)  # model_fn waits for release-load: must be Loading
        assert (loading.status_code, loading.json()) == (503, {"status": "Loading"})
        assert json.loads(status.read_text())["state"] == "loading"
        assert json.loads(status.read_text())["pid"] == proc.pid
        (model_dir / "release-load").touch()
        assert _first_answer(f"{base}/ping", proc, skip=(503,)).json() == {"status": "Healthy"}
        assert json.loads(status.read_text())["state"] == "ready"

        reply = requests.post(f"{base}/invocations", data=b'{"n": 1}', timeout=30, headers={
            "Content-Type": "application/json", "X-Amzn-SageMaker-Custom-Attributes": "a=b"})
        assert reply.json() == {"echo": {"n": 1}, "content_type": "application/json", "accept": "application/json"}
        assert reply.headers["X-Amzn-SageMaker-Custom-Attributes"] == "seen=a=b"
        err = requests.post(f"{base}/invocations", json={"boom": "test"}, timeout=30)
        assert err.status_code == 400 and err.json()["message"] == "boom requested by test"
        assert requests.post(f"{base}/invocations", data=b"{" * 1001, timeout=30).status_code == 413

        # /ping answers while a request is being handled.
        gate = tmp_path / "release-request"
        answers: list[requests.Response] = []
        slow = threading.Thread(target=lambda: answers.append(requests.post(
            f"{base}/invocations", json={"wait_for": str(gate), "n": 2}, timeout=120)))
        slow.start()
        assert requests.get(f"{base}/ping", timeout=10).status_code == 200
        gate.touch()
        slow.join(timeout=120)
        assert answers and answers[0].json()["echo"]["n"] == 2
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    assert code == 0  # SIGTERM: graceful stop


@pytest.mark.slow
def test_worker_whose_model_fn_needs_cuda_fails_with_its_own_error(sd1_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA model_fn would load")
    model_dir = tmp_path / "cuda"
    shutil.copytree(sd1_dir, model_dir)
    shutil.copytree(FIXTURES / "cuda_required" / "code", model_dir / "code")
    port, status = _free_port(), tmp_path / "status.json"
    proc = _spawn(model_dir, port, status, fail_grace_s=5)
    try:
        ping = _first_answer(f"http://127.0.0.1:{port}/ping", proc, skip=(503,))
        assert ping.status_code == 500 and ping.json()["status"] == "Failed"
        assert "CUDA" in ping.json()["error"]  # torch's own words, e.g. "Torch not compiled with CUDA enabled"
        data = json.loads(status.read_text())
        assert data["state"] == "failed" and data["error"] == ping.json()["error"] and data["pid"] == proc.pid
        assert proc.wait(timeout=120) == EXIT_LOAD_FAILED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_execution_parameters_route(hooks_client: TestClient, sd1_dir: Path) -> None:
    """Batch transform asks ``GET /execution-parameters``: the default handler offers single records, as many
    at once as one step batch holds; model code with its own request hooks answers 404 (AWS's defaults)."""
    reply = hooks_client.get("/execution-parameters")
    assert reply.status_code == 404 and reply.json()["type"] == "ResourceNotFoundException"
    server = ModelServer(HandlerService(sd1_dir, device="cpu", max_batch=4))
    client = TestClient(create_app(server), base_url="http://127.0.0.1:8080")
    assert client.get("/execution-parameters").status_code == 503  # not loaded yet
    assert server.load()
    reply = client.get("/execution-parameters")
    assert reply.status_code == 200
    assert reply.json() == {"MaxConcurrentTransforms": 4, "BatchStrategy": "SingleRecord", "MaxPayloadInMB": 6}
    # a MultiRecord mini-batch (one JSON request per line): one answer per line, in order
    lines = [{"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 2, "seed": s} for s in (5, 6)]
    body = b"\n".join(json.dumps(x).encode() for x in lines)
    reply = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 200
    assert [json.loads(x)["seeds"] for x in reply.content.splitlines()] == [[5], [6]]
    bad = client.post("/invocations", content=body + b"\n{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "line 3 of 3" in bad.json()["message"]
