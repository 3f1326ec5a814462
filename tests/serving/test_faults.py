"""Issue 11, "one request never takes down the others": a request past its timeout leaves its batch and the
worker carries on; requests on a worker killed with -9 are retried on a healthy one and all succeed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError
from conftest import DaemonProcess

# A custom handler over the default model: the daemon cannot estimate its cost, so a slow request reaches the
# worker (the default handler's admission may refuse one that cannot finish in time). It runs through the
# default model's step batcher, which honours the daemon's deadline.
_RUN_INFERENCE = '''\
import os

from sdmaker.schema import GenerateRequest


def predict_fn(data, model):
    result = model.run(GenerateRequest(**data))
    return {"seeds": result.seeds, "pid": os.getpid()}
'''


def _wait(predicate, what: str, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _workers(d: DaemonProcess, name: str) -> list[dict]:  # type: ignore[type-arg]
    return httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}").json()["workers"]


@pytest.fixture(scope="module")
def faults_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("faults-home"), env={"SDMAKER_STANDBY_WORKERS": "0"}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def run_model_dir(tmp_path_factory: pytest.TempPathFactory, sd1_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("run-model") / "model"
    shutil.copytree(sd1_dir, root)
    (root / "code").mkdir()
    (root / "code" / "inference.py").write_text(_RUN_INFERENCE)
    return root


def test_a_request_past_its_timeout_leaves_its_batch_and_the_worker_carries_on(
        faults_daemon: DaemonProcess, run_model_dir: Path) -> None:
    desc = faults_daemon.deploy("ft-timeout", run_model_dir, env={
        "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "20", "SDMAKER_MAX_BATCH": "4"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    rt = faults_daemon.boto("sagemaker-runtime")
    warm = {"prompt": "warm", "height": 64, "width": 64, "num_inference_steps": 2}
    for _ in range(5):  # the first call of a fresh worker is slow (lazy init); on a busy machine it may time out
        try:
            rt.invoke_endpoint(EndpointName="ft-timeout", ContentType="application/json", Body=json.dumps(warm))
            break
        except ClientError:
            continue
    (before,) = _workers(faults_daemon, "ft-timeout")
    outcome: dict[str, object] = {}

    def slow() -> None:  # far more than 20 s of work (3 images x 500 steps) in steps as
        # short as the normal request's: they share a batch
        try:
            rt.invoke_endpoint(EndpointName="ft-timeout", ContentType="application/json", Body=json.dumps(
                {"prompt": "slow", "height": 64, "width": 64, "num_inference_steps": 500, "seed": 1,
                 "num_images_per_prompt": 3}))
            outcome["slow"] = "answered 200"
        except ClientError as exc:
            outcome["slow"] = exc.response

    thread = threading.Thread(target=slow)
    thread.start()
    _wait(lambda: _workers(faults_daemon, "ft-timeout")[0]["state"] == "Busy", "the slow request to start")
    normal = json.loads(rt.invoke_endpoint(EndpointName="ft-timeout", ContentType="application/json", Body=json.dumps(
        {"prompt": "normal", "height": 64, "width": 64, "num_inference_steps": 2, "seed": 2}))["Body"].read())
    assert normal["pid"] == before["pid"] and normal["seeds"] == [2]
    thread.join(timeout=60)
    assert not thread.is_alive()
    response = outcome["slow"]
    assert isinstance(response, dict), response
    assert response["Error"]["Code"] == "ModelError" and response["OriginalStatusCode"] == 0
    assert "Your invocation timed out" in response["Error"]["Message"]
    # the worker was not killed: same process, no restart, and it serves the next request
    _wait(lambda: _workers(faults_daemon, "ft-timeout")[0]["state"] == "Ready", "the slot to come back", 30)
    (after,) = _workers(faults_daemon, "ft-timeout")
    assert after["pid"] == before["pid"] and after["restarts"] == before["restarts"]
    again = json.loads(rt.invoke_endpoint(EndpointName="ft-timeout", ContentType="application/json", Body=json.dumps(
        {"prompt": "again", "height": 64, "width": 64, "num_inference_steps": 2}))["Body"].read())
    assert again["pid"] == before["pid"]


def test_kill_9_of_a_busy_worker_loses_no_request(faults_daemon: DaemonProcess, sd1_dir: Path) -> None:
    # a larger timeout than the default 60 s: a restarted worker's first call is slow on a busy CPU
    desc = faults_daemon.deploy("ft-kill", sd1_dir, count=2, env={"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "300"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    rt = faults_daemon.boto("sagemaker-runtime")
    results: dict[int, object] = {}

    def invoke(i: int) -> None:
        try:
            answer = rt.invoke_endpoint(EndpointName="ft-kill", ContentType="application/json", Body=json.dumps(
                {"prompt": f"request {i}", "height": 64, "width": 64, "num_inference_steps": 20}))
            results[i] = json.loads(answer["Body"].read())
        except ClientError as exc:
            results[i] = exc.response

    first = [threading.Thread(target=invoke, args=(i,)) for i in range(6)]
    for t in first:
        t.start()
    _wait(lambda: any(w["state"] == "Busy" for w in _workers(faults_daemon, "ft-kill")), "the requests to start")
    victim = next(w["pid"] for w in _workers(faults_daemon, "ft-kill") if w["state"] == "Busy")
    os.kill(victim, signal.SIGKILL)
    # requests arriving right after the kill must not be handed the dead worker's slots
    second = [threading.Thread(target=invoke, args=(i,)) for i in range(6, 10)]
    for t in second:
        t.start()
    for t in first + second:
        t.join(timeout=400)
    failed = {i: r for i, r in results.items() if "generated_images" not in r}  # type: ignore[operator]
    assert not failed and len(results) == 10, failed
    for answer in results.values():
        assert len(answer["seeds"]) == 1  # type: ignore[index]
    _wait(lambda: all(w["state"] == "Ready" for w in _workers(faults_daemon, "ft-kill")), "the restart")
    assert victim not in {w["pid"] for w in _workers(faults_daemon, "ft-kill")}
