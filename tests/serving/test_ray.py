"""Endpoints on a real Ray cluster (``sdmaker up --ray``): two nodes on this machine, each a separate raylet
with 1 CPU, bound to 127.0.0.1; no mocks.

One cluster and one daemon for the module (starting Ray costs ~20 s on 2 cores). The instance type table is
overridden (``SDMAKER_RAY_INSTANCE_TYPES``) so that one replica takes one node's CPU: two replicas must land
on the two nodes. Each node caches models under its own node id, so the model transfer really happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess

pytestmark = pytest.mark.slow

_TYPES = {"ml.m5.large": {"num_cpus": 1}, "ml.g4dn.xlarge": {"num_cpus": 1}, "ml.c5.large": {"num_cpus": 1}}
_NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024**2, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, moto_server: str) -> Iterator[Any]:
    """Head (1 CPU) + one worker node (1 CPU); their replicas cache models under this module's home."""
    from ray.cluster_utils import Cluster

    home = tmp_path_factory.mktemp("ray-nodes-home")
    saved = {k: os.environ.get(k) for k in ("SDMAKER_HOME", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "RAY_DEDUP_LOGS")}
    # the nodes' environment (what a real node would be configured with): its home and its S3 access
    os.environ.update({"SDMAKER_HOME": str(home), "AWS_ENDPOINT_URL_S3": moto_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "RAY_DEDUP_LOGS": "0"})
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={**_NODE, "include_dashboard": False})
    try:
        cluster.add_node(**_NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_daemon(tmp_path_factory: pytest.TempPathFactory, ray_cluster: Any, moto_server: str) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("ray-daemon-home"),
                      env={"SDMAKER_RAY_ADDRESS": ray_cluster.address, "SDMAKER_RAY_INSTANCE_TYPES": json.dumps(_TYPES),
                           "AWS_ENDPOINT_URL_S3": moto_server, "HF_HUB_OFFLINE": "1"})
    d.start()
    yield d
    d.stop()


def _details(d: DaemonProcess, name: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}", timeout=30).json()


def _invoke(rt: Any, name: str, body: dict[str, Any]) -> tuple[int, Any]:
    from botocore.exceptions import ClientError

    try:
        out = rt.invoke_endpoint(EndpointName=name, ContentType="application/json", Body=json.dumps(body))
        return 200, json.loads(out["Body"].read())
    except ClientError as exc:
        return int(exc.response["ResponseMetadata"]["HTTPStatusCode"]), exc.response


def _ready_nodes(info: dict[str, Any]) -> set[str]:
    return {w["node"] for w in info["workers"] if w["state"] in ("Ready", "Busy")}


def _wait(predicate: Any, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.5)


def test_unreachable_ray_address_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sdmaker", "up", "--ray", "127.0.0.1:9"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SDMAKER_HOME": str(tmp_path)})
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in lines[0]


def test_two_replicas_on_two_nodes_fetch_the_model_and_both_serve(ray_daemon: DaemonProcess) -> None:
    desc = ray_daemon.deploy("mini2", "mini", count=2, instance_type="ml.m5.large")
    assert desc["EndpointStatus"] == "InService", desc
    rt = ray_daemon.boto("sagemaker-runtime")
    body = {"prompt": "a red square", "height": 64, "width": 64, "num_inference_steps": 2, "seed": 1}
    results: list[tuple[int, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(_invoke(rt, "mini2", body))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200] * 8, results
    info = _details(ray_daemon, "mini2")
    serving = [w for w in info["workers"] if w["state"] in ("Ready", "Busy")]
    assert len(serving) == 2 and len({w["node"] for w in serving}) == 2, info["workers"]
    assert all(w["served"] > 0 for w in serving), info["workers"]
    # no shared store: each node fetched the model from the daemon by digest (its own node-id cache)
    assert all(str(w["model_source"]).startswith("head (") for w in serving), info["workers"]
    ray_daemon.boto("sagemaker").delete_endpoint(EndpointName="mini2")


def test_a_dead_node_fails_its_request_with_424_and_the_replica_comes_back(
        ray_daemon: DaemonProcess, ray_cluster: Any, scripted_model_dir: Path) -> None:
    desc = ray_daemon.deploy("crash", scripted_model_dir, count=2, instance_type="ml.m5.large")
    assert desc["EndpointStatus"] == "InService", desc
    info = _details(ray_daemon, "crash")
    head_node = ray_cluster.head_node.node_id
    assert _ready_nodes(info) == {head_node, *(n.node_id for n in ray_cluster.worker_nodes)}, info["workers"]
    rt = ray_daemon.boto("sagemaker-runtime")
    # one slow request per replica (no step batching: each takes one at a time), then the worker node dies
    results: list[tuple[int, Any]] = []
    slow = [threading.Thread(target=lambda: results.append(_invoke(rt, "crash", {"sleep": 20}))) for _ in range(2)]
    for t in slow:
        t.start()
    _wait(lambda: _details(ray_daemon, "crash")["in_flight"] == 2, 30)
    time.sleep(1.0)
    worker_node = next(iter(ray_cluster.worker_nodes))
    ray_cluster.remove_node(worker_node, allow_graceful=False)
    for t in slow:
        t.join(timeout=60)
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 424], results
    failed = next(r for s, r in results if s == 424)
    assert failed["Error"]["Code"] == "ModelError", failed
    # the surviving replica keeps answering meanwhile
    assert _invoke(rt, "crash", {"n": 1})[0] == 200
    # a new node joins: Ray places the lost replica there; it fetches the model and serves
    new_node = ray_cluster.add_node(**_NODE)
    _wait(lambda: _ready_nodes(_details(ray_daemon, "crash")) == {head_node, new_node.node_id})
    seen: set[int] = set()
    for _ in range(20):
        status, out = _invoke(rt, "crash", {"n": 2})
        assert status == 200, out
        seen.add(out["pid"])
    info = _details(ray_daemon, "crash")
    assert len([w for w in info["workers"] if w["state"] in ("Ready", "Busy")]) == 2, info["workers"]
    ray_daemon.boto("sagemaker").delete_endpoint(EndpointName="crash")


def test_gpu_variant_on_a_cpu_cluster_fails_naming_the_gpu(ray_daemon: DaemonProcess) -> None:
    desc = ray_daemon.deploy("gpu", "mini", count=1, instance_type="ml.p3.2xlarge")
    assert desc["EndpointStatus"] == "Failed", desc
    assert "GPU" in desc["FailureReason"] and "no GPU" in desc["FailureReason"], desc["FailureReason"]
    ray_daemon.boto("sagemaker").delete_endpoint(EndpointName="gpu")
