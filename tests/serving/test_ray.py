"""Endpoints on a real Ray cluster (``sdmaker up --ray``): two nodes on this machine, each a separate raylet
with 1 CPU, bound to 127.0.0.1; no mocks.

One cluster and one daemon for the module (starting Ray costs ~20 s on 2 cores). The instance type table is
overridden (``SDMAKER_RAY_INSTANCE_TYPES``) so that one replica takes one node's CPU: two replicas must land
on the two nodes. Each node caches models under its own node id, so the model transfer really happens.
"""

from __future__ import annotations

import contextlib
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


def _start_cluster(attempts: int = 3) -> Any:
    """Head + one worker node. Ray gives a raylet a fixed 30 s to register, which a heavily loaded machine can
    miss: then the half-started cluster is stopped and started again."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        cluster = Cluster(initialize_head=False, connect=False)
        try:
            cluster.add_node(**_NODE, include_dashboard=False)
            cluster.add_node(**_NODE)
            cluster.wait_for_nodes()
            return cluster
        except Exception:
            cluster.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, moto_server: str) -> Iterator[Any]:
    """Head (1 CPU) + one worker node (1 CPU); their replicas cache models under this module's home."""
    home = tmp_path_factory.mktemp("ray-nodes-home")
    saved = {k: os.environ.get(k) for k in ("SDMAKER_HOME", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "RAY_DEDUP_LOGS")}
    # the nodes' environment (what a real node would be configured with): its home and its S3 access
    os.environ.update({"SDMAKER_HOME": str(home), "AWS_ENDPOINT_URL_S3": moto_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "RAY_DEDUP_LOGS": "0"})
    cluster = _start_cluster()
    cluster.nodes_home = home  # where replicas cache models: ray-nodes/<node id>/models/<digest>
    try:
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


@pytest.fixture(autouse=True)
def _endpoints_deleted(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every endpoint a test made is deleted after it, passed or failed: a failed test's replicas would hold the
    cluster's two CPUs, and every later test's replicas would wait for a slot that never frees."""
    yield
    if "ray_daemon" not in request.fixturenames:
        return
    from botocore.exceptions import ClientError

    daemon: DaemonProcess = request.getfixturevalue("ray_daemon")
    sm = daemon.boto("sagemaker")
    for endpoint in sm.list_endpoints()["Endpoints"]:
        with contextlib.suppress(ClientError):  # already gone: the test deleted it meanwhile
            sm.delete_endpoint(EndpointName=endpoint["EndpointName"])


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


def test_two_replicas_on_two_nodes_fetch_the_model_and_both_serve(ray_daemon: DaemonProcess, ray_cluster: Any) -> None:
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
    # no shared store: each node fetched the model from the daemon by digest into its own node-id cache. A
    # replica that Ray restarted on a node (a slow start on a loaded machine) finds that node's copy instead.
    assert all(str(w["model_source"]).startswith("head (") or w["model_source"] == "node cache"
               for w in serving), info["workers"]
    assert any(str(w["model_source"]).startswith("head (") for w in serving), info["workers"]
    nodes_home = Path(ray_cluster.nodes_home) / "ray-nodes"
    assert all((nodes_home / w["node"] / "models" / info["model_digest"]).is_dir() for w in serving), info["workers"]
    # the model route is authenticated even on loopback: no token, or a wrong one, gets nothing
    import httpx

    route = f"{ray_daemon.url}/sdmaker/v1/artifacts/{info['model_digest']}"
    assert httpx.get(route, timeout=10).status_code == 403
    assert httpx.get(route, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 403
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


def test_overload_on_ray_answers_503_with_retry_after(ray_daemon: DaemonProcess, scripted_model_dir: Path) -> None:
    """One replica taking one request at a time and a queue bound of 1: of 5 concurrent requests, the ones
    beyond the replica and its queue are refused at once with 503 and Retry-After, the others served."""
    from botocore.exceptions import ClientError

    desc = ray_daemon.deploy("busy", scripted_model_dir, count=1, instance_type="ml.m5.large",
                             env={"SDMAKER_MAX_QUEUE": "1"})
    assert desc["EndpointStatus"] == "InService", desc
    rt = ray_daemon.boto("sagemaker-runtime")
    answers: list[tuple[int, str | None]] = []

    def call() -> None:
        try:
            rt.invoke_endpoint(EndpointName="busy", ContentType="application/json", Body=json.dumps({"sleep": 4}))
            answers.append((200, None))
        except ClientError as exc:
            headers = exc.response["ResponseMetadata"].get("HTTPHeaders", {})
            answers.append((int(exc.response["ResponseMetadata"]["HTTPStatusCode"]), headers.get("retry-after")))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    refused = [a for a in answers if a[0] == 503]
    assert len([a for a in answers if a[0] == 200]) >= 2 and refused, answers
    assert all(retry for _, retry in refused), answers
    ray_daemon.boto("sagemaker").delete_endpoint(EndpointName="busy")


def test_gpu_variant_on_a_cpu_cluster_fails_naming_the_gpu(ray_daemon: DaemonProcess) -> None:
    desc = ray_daemon.deploy("gpu", "mini", count=1, instance_type="ml.p3.2xlarge")
    assert desc["EndpointStatus"] == "Failed", desc
    assert "GPU" in desc["FailureReason"] and "no GPU" in desc["FailureReason"], desc["FailureReason"]
    ray_daemon.boto("sagemaker").delete_endpoint(EndpointName="gpu")


def test_seed_sdk_cells_against_sdmaker_up_ray(ray_daemon: DaemonProcess, moto_server: str, seed_model_dir: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's HuggingFaceModel.deploy / predict / delete_endpoint, unchanged; the replica gets the model
    from S3 (where it came from), not from the daemon."""
    import tarfile

    import boto3
    from test_sdk import _sdmaker_env

    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for item in sorted(seed_model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket="sdmaker-ray-seed")
    s3.upload_file(str(archive), "sdmaker-ray-seed", "sd/model.tar.gz")
    for key, value in _sdmaker_env(ray_daemon.url, tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

    import sagemaker.session

    real_sleep = time.sleep

    class _FastTime:  # the SDK polls every 30 s; the endpoint needs seconds (as in test_sdk.py)
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            real_sleep(min(seconds, 0.5))

    monkeypatch.setattr(sagemaker.session, "time", _FastTime())
    from sagemaker.huggingface.model import HuggingFaceModel

    huggingface_model = HuggingFaceModel(model_data="s3://sdmaker-ray-seed/sd/model.tar.gz",
                                         role="arn:aws:iam::111122223333:role/sm", transformers_version="4.26",
                                         pytorch_version="1.13", py_version="py39")
    predictor = huggingface_model.deploy(initial_instance_count=1, instance_type="ml.g4dn.xlarge",
                                         endpoint_name="sdk-ray-endpoint")
    res = predictor.predict(data={"prompt": ["A bird is flying in space"], "height": 64, "width": 64,
                                  "num_inference_steps": 2, "num_images_per_prompt": 1})
    info = _details(ray_daemon, "sdk-ray-endpoint")
    predictor.delete_endpoint()

    assert len(res["generated_images"]) == 1
    assert [w["model_source"] for w in info["workers"] if w["state"] in ("Ready", "Busy")] == ["s3"], info["workers"]


_DIMENSION = "sagemaker:variant:DesiredInstanceCount"


@pytest.mark.slow
def test_autoscaling_api_takes_ray_replicas_from_1_to_2_and_back(ray_daemon: DaemonProcess,
                                                                 scripted_model_dir: Path) -> None:
    """The Application Auto Scaling API, as boto3 calls it, on a Ray endpoint: a target-tracking policy on
    concurrent requests (target 1, short cooldowns) becomes Serve's autoscaling, which takes the variant to 2
    replicas under sustained concurrent requests and back to 1 when idle, without replacing the replica that
    was serving; every request is answered."""
    desc = ray_daemon.deploy("scaled", scripted_model_dir, count=1, instance_type="ml.m5.large")
    assert desc["EndpointStatus"] == "InService", desc
    first = {w["replica"] for w in _details(ray_daemon, "scaled")["workers"]}
    aas = ray_daemon.boto("application-autoscaling")
    rid = "endpoint/scaled/variant/AllTraffic"
    aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=_DIMENSION,
                                 MinCapacity=1, MaxCapacity=2)
    aas.put_scaling_policy(
        PolicyName="concurrency", ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=_DIMENSION,
        PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration={
            "TargetValue": 1.0, "ScaleOutCooldown": 1, "ScaleInCooldown": 3,
            "PredefinedMetricSpecification": {"PredefinedMetricType":
                                              "SageMakerVariantConcurrentRequestsPerModelHighResolution"}})

    def ready() -> int:
        return sum(w["state"] in ("Ready", "Busy") for w in _details(ray_daemon, "scaled")["workers"])

    # Load is held (8 clients, each sending 3-second requests back to back) until the second replica is Ready
    # rather than for a fixed number of requests: how long Serve takes to start a replica depends on the
    # machine's load, and a fixed burst can end before a busy CI box has the new replica up.
    rt = ray_daemon.boto("sagemaker-runtime")
    answers: list[tuple[int, Any]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(_invoke(rt, "scaled", {"sleep": 3}))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    peak, deadline = 1, time.monotonic() + 240
    serving: set[str] = set()
    try:
        while peak < 2 and time.monotonic() < deadline:
            workers = _details(ray_daemon, "scaled")["workers"]
            serving = {w["replica"] for w in workers if w["state"] in ("Ready", "Busy")}
            peak = max(peak, len(serving))
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = [status for status, _ in answers]
    assert peak == 2 and statuses == [200] * len(answers), (
        peak, [a.get("Error") if s != 200 else s for s, a in answers])
    # the policy was applied in place: the replica that served before it is one of the two (not replaced)
    assert first <= serving, (first, serving)
    _wait(lambda: ready() == 1, timeout_s=120)
    policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)["ScalingPolicies"]
    assert [p["PolicyName"] for p in policies] == ["concurrency"]
    ray_daemon.boto("sagemaker").delete_endpoint(EndpointName="scaled")
