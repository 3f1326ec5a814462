"""Issue 11, SIGTERM and daemon kills: the daemon drains (new requests 503, in-flight ones finish or get a clean
503), exits within 30 s and removes its pid file; a standalone worker exits promptly while generating; request
statistics survive a kill -9 up to the last answered request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError
from conftest import DaemonProcess, _free_port, _wait_http


def _wait(predicate, what: str, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _details(d: DaemonProcess, name: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}").json()


def test_sigterm_drains_then_exits_and_removes_its_pid_file(tmp_path: Path, scripted_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path / "home", env={"SDMAKER_STANDBY_WORKERS": "0"}).start()
    try:
        desc = d.deploy("sd-drain", scripted_model_dir, count=2)
        assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
        assert (d.home / "daemon.pid").exists()
        rt = d.boto("sagemaker-runtime")
        outcome: dict[str, object] = {}

        def invoke(key: str, seconds: float) -> None:
            try:
                answer = rt.invoke_endpoint(EndpointName="sd-drain", Body=json.dumps({"sleep": seconds}),
                                            ContentType="application/json")
                outcome[key] = json.loads(answer["Body"].read())
            except ClientError as exc:
                outcome[key] = exc.response

        threads = [threading.Thread(target=invoke, args=("short", 3)), threading.Thread(target=invoke,
                                                                                          args=("long", 120))]
        for t in threads:
            t.start()
        _wait(lambda: all(w["state"] == "Busy" for w in _details(d, "sd-drain")["workers"]), "both requests to run")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        # a new request is refused the AWS way, while the daemon still listens
        refused = None
        for _ in range(100):
            try:
                refused = httpx.post(f"{d.url}/endpoints/sd-drain/invocations", content=b"{}",
                                     headers={"Content-Type": "application/json"}, timeout=10)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert refused is not None and refused.status_code == 503
        assert refused.headers["x-amzn-ErrorType"] == "ServiceUnavailable" and int(refused.headers["Retry-After"]) > 0
        assert "message" in refused.json()
        for t in threads:
            t.join(timeout=60)
        assert outcome["short"]["echo"] == {"sleep": 3}  # type: ignore[index]  # finished within the grace
        long = outcome["long"]  # still running when the grace ran out: a clean AWS error, never a bare 500
        assert isinstance(long, dict) and long["Error"]["Code"] == "ServiceUnavailable", long
        assert long["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert d.proc.wait(timeout=30) == 0
        assert not (d.home / "daemon.pid").exists()
    finally:
        d.stop(signal.SIGKILL)


def test_statistics_survive_a_kill_9_up_to_the_last_request(tmp_path: Path, scripted_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path / "home", env={"SDMAKER_STANDBY_WORKERS": "0"}).start()
    try:
        desc = d.deploy("sd-stats", scripted_model_dir)
        assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
        rt = d.boto("sagemaker-runtime")
        for i in range(7):
            rt.invoke_endpoint(EndpointName="sd-stats", Body=json.dumps({"n": i}), ContentType="application/json")
        with pytest.raises(ClientError):
            rt.invoke_endpoint(EndpointName="sd-stats", Body=b'{"fail": "x"}', ContentType="application/json")
        d.stop(signal.SIGKILL)  # at once after the last answer
        d.start()
        d.boto("sagemaker").get_waiter("endpoint_in_service").wait(
            EndpointName="sd-stats", WaiterConfig={"Delay": 0.5, "MaxAttempts": 240})
        info = _details(d, "sd-stats")
        assert (info["invocations"], info["errors"]) == (8, 1)
    finally:
        d.stop()


def test_serve_exits_promptly_on_sigterm_while_generating(tmp_path: Path, sd1_dir: Path) -> None:
    port = _free_port()
    env = {**__import__("os").environ, "SDMAKER_HOME": str(tmp_path / "home")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "serve", str(sd1_dir), "--port", str(port)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/ping", proc, timeout_s=180)
        _wait(lambda: httpx.get(url + "/ping").status_code == 200, "the model to load", 180)
        outcome: dict[str, object] = {}

        def generate() -> None:
            try:
                outcome["reply"] = httpx.post(url + "/invocations", timeout=300, json={
                    "prompt": "long", "height": 64, "width": 64, "num_inference_steps": 500})
            except httpx.TransportError as exc:
                outcome["reply"] = exc

        thread = threading.Thread(target=generate)
        thread.start()
        _wait(lambda: "step" in log.read_text() or thread.is_alive(), "the request to start")
        time.sleep(1.0)  # let it get into its steps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()[-2000:]
        thread.join(timeout=15)
        reply = outcome["reply"]
        assert not isinstance(reply, httpx.Response) or reply.status_code in (200, 503)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
