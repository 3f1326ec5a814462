"""The asynchronous job queue under kill -9 and SIGTERM (issue 13), and its bound.

One daemon for the module (S3 = the moto server, with bucket versioning on, so a second write of any
object shows as a second version). The endpoint runs the scripted model: these tests are about the
queue, and a request that sleeps a moment keeps jobs in flight without the cost of generating images.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DaemonProcess
from test_async import TERMINAL, deploy_async, job, s3_client, wait_terminal

ENDPOINT = "chaos-echo"
MAX_QUEUE = 12


@pytest.fixture(scope="module")
def versioned_bucket(moto_server: str) -> str:
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(moto_server)
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture(scope="module")
def chaos_daemon(tmp_path_factory: pytest.TempPathFactory, moto_server: str, scripted_model_dir: Path,
                 versioned_bucket: str):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("chaos-home"), env={
        "AWS_ENDPOINT_URL_S3": moto_server, "HF_HUB_OFFLINE": "1", "SDMAKER_ASYNC_MAX_QUEUE": str(MAX_QUEUE),
        "SDMAKER_STANDBY_WORKERS": "0"})  # the scripted model starts a fresh process either way
    d.start()
    deploy_async(d, ENDPOINT, scripted_model_dir, f"s3://{versioned_bucket}/out",
                 failure=f"s3://{versioned_bucket}/failed", max_concurrent=4,
                 env={"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "120"})
    yield d
    d.stop()


def _submit(d: DaemonProcess, body: dict[str, Any], inference_id: str | None = None,
            http: httpx.Client | None = None) -> httpx.Response:
    headers = {"X-Amzn-SageMaker-Content-Type": "application/json"}
    if inference_id:
        headers["X-Amzn-SageMaker-Inference-Id"] = inference_id
    post = http.post if http is not None else httpx.post
    return post(f"{d.url}/endpoints/{ENDPOINT}/async-invocations", content=json.dumps(body).encode(),
                headers=headers, timeout=30)


def _restart(d: DaemonProcess, sig: int) -> None:
    d.stop(sig)
    d.start()


def _wait(check: Any, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _listed(d: DaemonProcess, ids: list[str]) -> set[str]:
    """The states of the jobs ``ids`` (one list call)."""
    jobs = httpx.get(f"{d.url}/sdmaker/v1/jobs", params={"endpoint": ENDPOINT, "limit": 50}, timeout=30).json()["jobs"]
    return {j["state"] for j in jobs if j["id"] in ids}


def _versions(moto_server: str, bucket: str) -> dict[str, int]:
    """Every object key of the bucket with how many versions were written to it."""
    s3 = s3_client(moto_server)
    counts: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for version in page.get("Versions", []):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def test_a_full_queue_answers_503_with_retry_after(chaos_daemon: DaemonProcess) -> None:
    blocker = _submit(chaos_daemon, {"sleep": 60}).json()["InferenceId"]
    ids = [blocker]
    _wait(lambda: job(chaos_daemon.url, blocker)["state"] == "running", "the first job to start")
    for _ in range(3):  # MaxConcurrentInvocationsPerInstance 4: three more run beside it
        ids.append(_submit(chaos_daemon, {"sleep": 60}).json()["InferenceId"])
    _wait(lambda: all(job(chaos_daemon.url, i)["state"] == "running" for i in ids), "four running jobs")
    for _ in range(MAX_QUEUE):
        answer = _submit(chaos_daemon, {"n": 1})
        assert answer.status_code == 202
        ids.append(answer.json()["InferenceId"])
    refused = _submit(chaos_daemon, {"n": 2})
    assert refused.status_code == 503 and refused.headers["x-amzn-ErrorType"] == "ServiceUnavailable"
    assert int(refused.headers["Retry-After"]) > 0 and "SDMAKER_ASYNC_MAX_QUEUE" in refused.json()["message"]
    for job_id in ids:  # clear the queue for the next tests (a job may have finished meanwhile: it stays so)
        httpx.post(f"{chaos_daemon.url}/sdmaker/v1/jobs/{job_id}/cancel", timeout=60)
    states = [job(chaos_daemon.url, i)["state"] for i in ids]
    assert set(states) <= {"cancelled", "succeeded"} and states.count("cancelled") >= MAX_QUEUE


@pytest.mark.slow
def test_sigterm_finishes_or_requeues_running_jobs(chaos_daemon: DaemonProcess, moto_server: str,
                                                   versioned_bucket: str) -> None:
    ids = [f"term-{k}" for k in range(8)]
    for job_id in ids:
        assert _submit(chaos_daemon, {"sleep": 2, "id": job_id}, job_id).status_code == 202
    _wait(lambda: sum(job(chaos_daemon.url, i)["state"] == "running" for i in ids) >= 2, "jobs to run")
    assert chaos_daemon.proc is not None
    started = time.monotonic()
    chaos_daemon.proc.send_signal(signal.SIGTERM)
    chaos_daemon.proc.wait(timeout=60)
    assert time.monotonic() - started <= 30, "the daemon must exit within 30 s of SIGTERM"
    chaos_daemon.start()
    infos = [wait_terminal(chaos_daemon.url, i) for i in ids]
    assert [i["state"] for i in infos] == ["succeeded"] * len(ids)
    versions = _versions(moto_server, versioned_bucket)
    assert all(versions.get(i["output_location"].split("/", 3)[3]) == 1 for i in infos), versions


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 20 daemon restarts, each restarting its worker: minutes on a loaded 2-core machine
def test_kill_9_of_daemon_and_workers_loses_and_duplicates_nothing(chaos_daemon: DaemonProcess, moto_server: str,
                                                                   versioned_bucket: str) -> None:
    cycles, per_cycle = 20, 10
    all_ids: list[str] = []
    in_flight: list[int] = []  # jobs queued or running just before each kill
    for cycle in range(cycles):
        ids = [f"chaos-{cycle}-{k}" for k in range(per_cycle)]
        with httpx.Client() as http:  # all ten queued at once: 4 run (MaxConcurrentInvocationsPerInstance), 6 wait
            for k, job_id in enumerate(ids):
                answer = _submit(chaos_daemon, {"sleep": 0.1 + 0.1 * (k % 3), "id": job_id}, job_id, http)
                assert answer.status_code == 202, answer.text
        all_ids += ids
        _wait(lambda ids=ids: _listed(chaos_daemon, ids) & {"running", "succeeded"}, f"cycle {cycle}: a started job")
        in_flight.append(sum(job(chaos_daemon.url, i)["state"] in ("queued", "running") for i in ids))
        if cycle % 2:  # a worker dies under its jobs first
            workers = httpx.get(f"{chaos_daemon.url}/sdmaker/v1/endpoints/{ENDPOINT}", timeout=30).json()["workers"]
            busy = [w["pid"] for w in workers if w["state"] == "Busy"] or [w["pid"] for w in workers]
            os.kill(busy[0], signal.SIGKILL)
            time.sleep(0.05)
        _restart(chaos_daemon, signal.SIGKILL)
        for job_id in ids:
            wait_terminal(chaos_daemon.url, job_id, timeout_s=300)

    s3 = s3_client(moto_server)
    infos = [job(chaos_daemon.url, i) for i in all_ids]
    versions = _versions(moto_server, versioned_bucket)
    terminal = [i for i in infos if i["state"] in TERMINAL]
    succeeded = [i for i in infos if i["state"] == "succeeded"]
    key = lambda uri: uri.split("/", 3)[3]  # noqa: E731
    without_output = [i["id"] for i in succeeded if key(i["output_location"]) not in versions]
    duplicated = {k: n for k, n in versions.items() if n > 1}
    both = [i["id"] for i in infos if key(i["output_location"]) in versions and key(i["failure_location"]) in versions]
    assert len(terminal) == cycles * per_cycle, "jobs lost"
    assert len(succeeded) == cycles * per_cycle, [(i["id"], i["state"], i["failure_reason"]) for i in infos
                                                   if i["state"] != "succeeded"]
    assert without_output == [] and duplicated == {} and both == []
    assert sum(in_flight) >= cycles * per_cycle // 2, in_flight  # the kills did land on jobs in flight
    for info in succeeded[:3]:
        bucket, name = info["output_location"][5:].split("/", 1)
        echoed = json.loads(s3.get_object(Bucket=bucket, Key=name)["Body"].read())["echo"]
        assert echoed["id"] == info["id"]
