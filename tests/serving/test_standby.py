"""Warm standby workers (cold start) and step batching exposed on endpoints, through a real daemon."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import DaemonProcess

from sdmaker.serving.daemon._standby import incompatible_env


def _wait(predicate, what: str, timeout_s: float = 180.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _standby(d: DaemonProcess) -> dict:
    return httpx.get(f"{d.url}/sdmaker/v1/standby").json()


def _ready_standby_pid(d: DaemonProcess) -> int:
    def ready() -> int | None:
        pids = [s["pid"] for s in _standby(d)["standbys"] if s["state"] == "ready"]
        return pids[0] if pids else None

    return int(_wait(ready, "a ready standby worker"))


def _worker(d: DaemonProcess, name: str) -> dict:
    return httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}").json()["workers"][0]


def _log(d: DaemonProcess, name: str) -> str:
    return (d.home / "endpoints" / name / "endpoint.log").read_text(errors="replace")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def standby_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("standby-home"), env={"HF_HUB_OFFLINE": "1"}).start()
    yield d
    d.stop()


def test_compatibility_rule_only_ignores_runtime_variables() -> None:
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "SDMAKER_HOME": "/h"}
    runtime_only = {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAGEMAKER_PROGRAM": "x.py",
                    "SCRIPTED": "1"}
    assert incompatible_env(base, runtime_only) == []
    assert incompatible_env(base, {**base, "HF_HOME": "/x", "OMP_WAIT_POLICY": "passive"}) == ["HF_HOME",
                                                                                              "OMP_WAIT_POLICY"]
    assert incompatible_env(base, {k: v for k, v in base.items() if k != "PATH"}) == ["PATH"]


def test_endpoint_starts_from_a_standby_and_batches_concurrent_requests(standby_daemon: DaemonProcess,
                                                                        sd1_dir: Path) -> None:
    d = standby_daemon
    pid = _ready_standby_pid(d)
    desc = d.deploy("sb-tiny", sd1_dir, env={"SDMAKER_MAX_BATCH": "3", "OMP_NUM_THREADS": "1"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    worker = _worker(d, "sb-tiny")
    assert worker["standby"] is True and worker["pid"] == pid and worker["max_batch"] == 3
    assert f"from warm standby pid {pid}" in _log(d, "sb-tiny")
    assert "started from warm standby" in _log(d, "sb-tiny")  # the worker's own log line, after redirection
    assert pid not in [s["pid"] for s in _standby(d)["standbys"]]

    from PIL import Image

    rt = d.boto("sagemaker-runtime")
    body = json.dumps({"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 2, "seed": 3})
    png = rt.invoke_endpoint(EndpointName="sb-tiny", Body=body, ContentType="application/json",
                             Accept="image/png")["Body"].read()
    image = Image.open(io.BytesIO(png))
    assert image.size == (64, 64) and len(set(image.convert("L").getdata())) > 1

    # three clients at once: the pool hands all three to the one worker, whose StepBatcher runs them together
    clients = [d.boto("sagemaker-runtime") for _ in range(3)]
    barrier = threading.Barrier(3)
    answers: list[dict] = []

    def call(client, seed: int) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        req = json.dumps({"prompt": "a blue square", "height": 64, "width": 64, "num_inference_steps": 8,
                          "seed": seed})
        answers.append(json.loads(client.invoke_endpoint(EndpointName="sb-tiny", Body=req,
                                                         ContentType="application/json")["Body"].read()))

    threads = [threading.Thread(target=call, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(answers) == 3 and all(len(a["generated_images"]) == 1 for a in answers)
    assert sorted(a["seeds"][0] for a in answers) == [0, 1, 2]
    assert _worker(d, "sb-tiny")["peak_in_flight"] >= 2


def test_standby_is_replaced_after_use(standby_daemon: DaemonProcess) -> None:
    used = _worker(standby_daemon, "sb-tiny")["pid"]
    pid = _ready_standby_pid(standby_daemon)
    assert pid != used
    info = _standby(standby_daemon)
    assert info["used"] >= 1 and info["spawned"] >= 2
    os.kill(pid, signal.SIGKILL)  # a standby that dies while waiting is replaced too
    _wait(lambda: not _alive(pid), "the killed standby to be reaped")

    def replacement() -> int | None:  # the pool notices the death a moment after the kernel reaps it
        pids = [s["pid"] for s in _standby(standby_daemon)["standbys"] if s["state"] == "ready" and s["pid"] != pid]
        return pids[0] if pids else None

    assert _wait(replacement, "a new ready standby") != pid


def test_failed_model_fn_from_a_standby_reports_the_users_error(standby_daemon: DaemonProcess,
                                                                scripted_model_dir: Path) -> None:
    d = standby_daemon
    pid = _ready_standby_pid(d)
    desc = d.deploy("sb-fail", scripted_model_dir, env={"SCRIPTED_LOAD_FAIL": "no weights here"})
    assert desc["EndpointStatus"] == "Failed"
    assert "no weights here" in desc["FailureReason"]
    assert f"from warm standby pid {pid}" in _log(d, "sb-fail")


def test_import_time_variable_starts_a_fresh_worker(standby_daemon: DaemonProcess, scripted_model_dir: Path,
                                                    tmp_path: Path) -> None:
    d = standby_daemon
    pid = _ready_standby_pid(d)
    desc = d.deploy("sb-fresh", scripted_model_dir, env={"TORCH_HOME": str(tmp_path)})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    worker = _worker(d, "sb-fresh")
    assert worker["standby"] is False and worker["pid"] != pid
    assert worker["max_batch"] == 0  # code/inference.py hooks are opaque: no batching unless asked for
    assert "as a fresh process" in _log(d, "sb-fresh") and "TORCH_HOME" in _log(d, "sb-fresh")
    assert pid in [s["pid"] for s in _standby(d)["standbys"]]  # left for the next compatible endpoint


def test_max_batch_default_and_validation() -> None:
    from sdmaker.errors import ConfigError
    from sdmaker.serving.daemon._variant import DEFAULT_MAX_BATCH, max_batch_for

    assert max_batch_for({}, default_handler=True) == DEFAULT_MAX_BATCH == 8
    assert max_batch_for({}, default_handler=False) == 0
    assert max_batch_for({"SDMAKER_MAX_BATCH": "0"}, default_handler=True) == 0
    assert max_batch_for({"SDMAKER_MAX_BATCH": "2"}, default_handler=False) == 2
    with pytest.raises(ConfigError, match="SDMAKER_MAX_BATCH"):
        max_batch_for({"SDMAKER_MAX_BATCH": "-1"}, default_handler=True)


def test_cli_create_passes_max_batch(standby_daemon: DaemonProcess, scripted_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from sdmaker.cli import app

    res = CliRunner().invoke(app, ["endpoint", "create", "sb-cli", "--model", str(scripted_model_dir),
                                   "--max-batch", "2"], env={"SDMAKER_URL": standby_daemon.url})
    assert res.exit_code == 0, res.output
    assert _worker(standby_daemon, "sb-cli")["max_batch"] == 2
    res = CliRunner().invoke(app, ["endpoint", "describe", "sb-cli"], env={"SDMAKER_URL": standby_daemon.url})
    assert "up to 2 requests per worker" in res.output


def test_killed_daemon_takes_its_standby_along(standby_daemon: DaemonProcess) -> None:
    pid = _ready_standby_pid(standby_daemon)
    standby_daemon.stop(signal.SIGKILL)
    _wait(lambda: not _alive(pid), "the orphaned standby to exit", timeout_s=30)


def test_standby_workers_can_be_turned_off(tmp_path: Path, scripted_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path / "home", env={"SDMAKER_STANDBY_WORKERS": "0"}).start()
    try:
        assert _standby(d) == {"count": 0, "spawned": 0, "used": 0, "failures": 0, "standbys": []}
        desc = d.deploy("sb-off", scripted_model_dir)
        assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
        assert _worker(d, "sb-off")["standby"] is False
        assert "SDMAKER_STANDBY_WORKERS=0" in _log(d, "sb-off")
        assert _standby(d)["spawned"] == 0
    finally:
        d.stop()
