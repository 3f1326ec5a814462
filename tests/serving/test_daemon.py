"""Daemon robustness: a worker killed mid-request (retried), a daemon restart, a killed daemon, metrics, authentication."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError
from conftest import DaemonProcess


def _details(d: DaemonProcess, name: str) -> dict:
    return httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}").json()


def _wait(predicate, what: str, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def own_daemon(tmp_path_factory: pytest.TempPathFactory, scripted_model_dir: Path):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("restart-home")).start()
    desc = d.deploy("dm-echo", scripted_model_dir)
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    yield d
    d.stop()


def test_worker_killed_mid_request_is_retried_on_the_restarted_worker(own_daemon: DaemonProcess) -> None:
    """Issue 11: a request whose worker died under it is sent once more (here: to the same worker, restarted)."""
    rt = own_daemon.boto("sagemaker-runtime")
    before = _details(own_daemon, "dm-echo")["workers"][0]
    outcome: dict[str, object] = {}

    def slow() -> None:
        try:
            answer = rt.invoke_endpoint(EndpointName="dm-echo", Body=b'{"sleep": 3}', ContentType="application/json")
            outcome["result"] = json.loads(answer["Body"].read())
        except ClientError as exc:
            outcome["result"] = exc.response

    thread = threading.Thread(target=slow)
    thread.start()
    _wait(lambda: _details(own_daemon, "dm-echo")["workers"][0]["state"] == "Busy", "the request to start")
    os.kill(before["pid"], signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the in-flight request hung"
    answer = outcome["result"]
    assert isinstance(answer, dict) and answer.get("echo") == {"sleep": 3}, answer
    assert answer["pid"] != before["pid"]  # answered by the restarted process
    after = _details(own_daemon, "dm-echo")["workers"][0]
    assert after["pid"] == answer["pid"] and after["restarts"] == before["restarts"] + 1


def test_a_request_that_kills_its_worker_twice_is_answered_model_error(own_daemon: DaemonProcess) -> None:
    rt = own_daemon.boto("sagemaker-runtime")
    with pytest.raises(ClientError) as info:
        rt.invoke_endpoint(EndpointName="dm-echo", Body=b'{"exit": true}', ContentType="application/json")
    response = info.value.response
    assert response["Error"]["Code"] == "ModelError" and response["OriginalStatusCode"] == 500
    assert "died" in response["Error"]["Message"] and "after a retry" in response["Error"]["Message"]
    _wait(lambda: _details(own_daemon, "dm-echo")["workers"][0]["state"] == "Ready", "the restart")
    answer = json.loads(rt.invoke_endpoint(EndpointName="dm-echo", Body=b'{"n": 1}',
                                           ContentType="application/json")["Body"].read())
    assert answer["echo"] == {"n": 1}


def test_metrics_count_requests_errors_and_latency(own_daemon: DaemonProcess) -> None:
    rt = own_daemon.boto("sagemaker-runtime")
    rt.invoke_endpoint(EndpointName="dm-echo", Body=b"{}", ContentType="application/json")
    with pytest.raises(ClientError):
        rt.invoke_endpoint(EndpointName="dm-echo", Body=b'{"fail": "x"}', ContentType="application/json")
    text = httpx.get(own_daemon.url + "/metrics").text
    assert 'sdmaker_invocations_total{endpoint="dm-echo",status="200"}' in text
    assert 'sdmaker_invocation_errors_total{code="ModelError",endpoint="dm-echo"}' in text
    assert 'sdmaker_invocation_latency_seconds_count{endpoint="dm-echo"}' in text
    assert 'sdmaker_queue_depth{endpoint="dm-echo"} 0.0' in text
    info = _details(own_daemon, "dm-echo")
    assert info["invocations"] >= 2 and info["errors"] >= 1
    assert info["latency_p50_s"] is not None and info["latency_p95_s"] >= info["latency_p50_s"]


def test_daemon_restart_brings_endpoints_back(own_daemon: DaemonProcess) -> None:
    before = _details(own_daemon, "dm-echo")
    old_pid = before["workers"][0]["pid"]
    assert before["invocations"] >= 2  # the tests above invoked it
    own_daemon.stop()
    assert not _alive(old_pid), "a stopped daemon must stop its workers"
    own_daemon.start()
    sm = own_daemon.boto("sagemaker")
    sm.get_waiter("endpoint_in_service").wait(EndpointName="dm-echo", WaiterConfig={"Delay": 0.5, "MaxAttempts": 240})
    rt = own_daemon.boto("sagemaker-runtime")
    answer = json.loads(rt.invoke_endpoint(EndpointName="dm-echo", Body=b'{"back": true}',
                                           ContentType="application/json")["Body"].read())
    assert answer["echo"] == {"back": True}
    # request counts and recent latencies were saved at shutdown and restored with the endpoint
    after = _details(own_daemon, "dm-echo")
    assert after["invocations"] == before["invocations"] + 1 and after["errors"] == before["errors"]
    assert after["latency_p50_s"] is not None


def test_killed_daemon_leaves_no_orphan_workers(own_daemon: DaemonProcess) -> None:
    own_daemon.boto("sagemaker").get_waiter("endpoint_in_service").wait(
        EndpointName="dm-echo", WaiterConfig={"Delay": 0.5, "MaxAttempts": 240})
    pid = _details(own_daemon, "dm-echo")["workers"][0]["pid"]
    own_daemon.stop(signal.SIGKILL)
    _wait(lambda: not _alive(pid), "the orphaned worker to exit", timeout_s=30)
    own_daemon.start()  # leave it running for the fixture's teardown


# -- authentication ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A loopback daemon told to require credentials (tests never bind anything but 127.0.0.1)."""
    d = DaemonProcess(tmp_path_factory.mktemp("auth-home"), env={
        "SDMAKER_REQUIRE_AUTH": "1", "SDMAKER_ACCESS_KEY_ID": "AKIDSDMAKER", "SDMAKER_SECRET_ACCESS_KEY": "s3cret",
        "SDMAKER_API_TOKEN": "tok-123"}).start()
    yield d
    d.stop()


def test_sigv4_signed_requests_with_the_daemon_keys_pass(auth_daemon: DaemonProcess) -> None:
    sm = auth_daemon.boto("sagemaker", key="AKIDSDMAKER", secret="s3cret")
    assert sm.list_endpoints()["Endpoints"] == []
    rt = auth_daemon.boto("sagemaker-runtime", key="AKIDSDMAKER", secret="s3cret")
    with pytest.raises(rt.exceptions.ValidationError):  # authenticated, then "not found"
        rt.invoke_endpoint(EndpointName="nothing", Body=b'{"a": 1}', ContentType="application/json")


@pytest.mark.parametrize(("key", "secret"), [("AKIDSDMAKER", "wrong"), ("OTHERKEY", "s3cret")])
def test_wrong_sigv4_credentials_get_403(auth_daemon: DaemonProcess, key: str, secret: str) -> None:
    sm = auth_daemon.boto("sagemaker", key=key, secret=secret)
    with pytest.raises(ClientError) as info:
        sm.list_endpoints()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    rt = auth_daemon.boto("sagemaker-runtime", key=key, secret=secret)
    with pytest.raises(ClientError) as info:
        rt.invoke_endpoint(EndpointName="x", Body=b"{}", ContentType="application/json")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_unauthenticated_and_bearer_requests(auth_daemon: DaemonProcess) -> None:
    assert httpx.get(auth_daemon.url + "/metrics").status_code == 403
    assert httpx.get(auth_daemon.url + "/sdmaker/v1/endpoints").status_code == 403
    assert httpx.get(auth_daemon.url + "/ping").status_code == 200  # liveness stays open
    bad = httpx.get(auth_daemon.url + "/metrics", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 403
    good = httpx.get(auth_daemon.url + "/sdmaker/v1/endpoints", headers={"Authorization": "Bearer tok-123"})
    assert good.status_code == 200 and good.json() == {"endpoints": []}
    log = auth_daemon.log.read_text()
    assert "refused unauthenticated request GET /metrics" in log


def test_workers_do_not_see_the_daemon_secrets(auth_daemon: DaemonProcess, scripted_model_dir: Path) -> None:
    keys = {"key": "AKIDSDMAKER", "secret": "s3cret"}
    desc = auth_daemon.deploy("auth-echo", scripted_model_dir, **keys)
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    rt = auth_daemon.boto("sagemaker-runtime", **keys)
    answer = json.loads(rt.invoke_endpoint(EndpointName="auth-echo", Body=b"{}", ContentType="application/json")
                        ["Body"].read())
    assert answer["secrets_seen"] == []
    sm = auth_daemon.boto("sagemaker", **keys)
    with pytest.raises(ClientError, match="LD_PRELOAD are not allowed"):
        sm.create_model(ModelName="preload", ExecutionRoleArn="arn:aws:iam::1:role/r", PrimaryContainer={
            "Image": "x", "ModelDataUrl": str(scripted_model_dir), "Environment": {"LD_PRELOAD": "/tmp/evil.so"}})
    sm.delete_endpoint(EndpointName="auth-echo")


def test_non_loopback_bind_without_credentials_is_refused_before_binding(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDMAKER_")}
    env["SDMAKER_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "sdmaker", "up", "--host", "0.0.0.0", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "refusing to listen on 0.0.0.0 without credentials" in proc.stderr.replace("\n", " ")
