"""Scale-out benchmark: endpoints on a Ray cluster (``sdmaker up --ray``), on this machine.

A local Ray cluster of two nodes (separate raylets, 1 CPU each, 127.0.0.1) and a daemon pointed at it;
the built-in ``mini`` model with its default recipe (64x64, 10 steps), fixed seed, torch on 1 thread per worker (``OMP_NUM_THREADS=1``
in the model's Environment, on both backends, so the comparison is about placement, not threads).

* images/s with 1 replica (one node's CPU) vs 2 replicas (both nodes), the same client load: 8 clients,
  the same number of requests, step batching off (``SDMAKER_MAX_BATCH=0``: one request per replica at a
  time, so the figure is about replicas, not batch width). The target on separate machines is >= 1.8x; here both "nodes" share this
  machine's cores with the daemon and the client, so the figure is what two cores give, said as measured.
* per-request overhead of the Ray backend vs the local backend: one client, sequential requests alternating
  between a daemon with one Ray replica and a daemon with one local worker process, both up at once (so
  machine load hits both alike), medians.
* create -> InService on Ray (1 replica: the model fetched to the node by digest, the worker started).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import row
from bench._daemon import BenchDaemon

__all__ = ["run"]

# mini's own default recipe (64x64, dpmpp_2m 10 steps, DeepCache 2): what a client that sends only a prompt
# gets. The fixed per-request cost of each backend (HTTP, Serve handle, actor hop) is measured against it.
_REQUEST = {"prompt": "a red circle on a white background", "seed": 1}
_ENV = {"OMP_NUM_THREADS": "1", "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "600", "SDMAKER_MAX_BATCH": "0"}
_NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024**2, "node_ip_address": "127.0.0.1"}


def _deploy(d: BenchDaemon, name: str, count: int) -> float:
    sm = d.client("sagemaker")
    started = time.perf_counter()
    sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                    PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": "mini", "Environment": _ENV})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": count, "InstanceType": "ml.m5.large"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    while (desc := sm.describe_endpoint(EndpointName=name))["EndpointStatus"] == "Creating":
        time.sleep(0.05)
    if desc["EndpointStatus"] != "InService":
        raise RuntimeError(f"endpoint {name} {desc['EndpointStatus']}: {desc.get('FailureReason')}")
    return time.perf_counter() - started


def _delete(d: BenchDaemon, name: str) -> None:
    sm = d.client("sagemaker")
    sm.delete_endpoint(EndpointName=name)
    sm.delete_endpoint_config(EndpointConfigName=name)
    sm.delete_model(ModelName=name)


def _images_per_s(d: BenchDaemon, name: str, clients: int, requests: int) -> float:
    rt = d.client("sagemaker-runtime")
    body = json.dumps(_REQUEST)
    for _ in range(2):  # warm every replica's first request
        rt.invoke_endpoint(EndpointName=name, ContentType="application/json", Body=body)
    left = list(range(requests))
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if not left:
                    return
                left.pop()
            try:
                rt.invoke_endpoint(EndpointName=name, ContentType="application/json", Body=body)["Body"].read()
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(str(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return requests / elapsed


def _latencies(targets: list[tuple[BenchDaemon, str]], n: int) -> list[float]:
    """Median latency of each (daemon, endpoint), requests alternating between them."""
    clients = [(d.client("sagemaker-runtime"), name) for d, name in targets]
    body = json.dumps(_REQUEST)
    times: list[list[float]] = [[] for _ in clients]
    for i in range(n + 3):
        for k, (rt, name) in enumerate(clients):
            started = time.perf_counter()
            rt.invoke_endpoint(EndpointName=name, ContentType="application/json", Body=body)["Body"].read()
            if i >= 3:  # the first requests warm each worker
                times[k].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def run(quick: bool) -> list[dict[str, Any]]:
    from ray.cluster_utils import Cluster

    requests, latency_n = (24, 15) if quick else (64, 40)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdmaker-bench-ray-") as tmp:
        saved = os.environ.get("SDMAKER_HOME")
        os.environ["SDMAKER_HOME"] = str(Path(tmp) / "nodes")  # the nodes' own homes (model caches by node id)
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={**_NODE, "include_dashboard": False})
        daemons: list[BenchDaemon] = []
        try:
            cluster.add_node(**_NODE)
            cluster.wait_for_nodes()
            ray_d = BenchDaemon(Path(tmp) / "ray", env={"SDMAKER_RAY_ADDRESS": cluster.address,
                                                        "SDMAKER_RAY_INSTANCE_TYPES": json.dumps(
                                                            {"ml.m5.large": {"num_cpus": 1}})})
            daemons.append(ray_d)
            create_s = _deploy(ray_d, "one", 1)
            one = _images_per_s(ray_d, "one", 8, requests)
            local_d = BenchDaemon(Path(tmp) / "local", env={"SDMAKER_STANDBY_WORKERS": "0"})
            daemons.append(local_d)
            _deploy(local_d, "local", 1)
            ray_latency, local_latency = _latencies([(ray_d, "one"), (local_d, "local")], latency_n)
            local_d.stop()
            daemons.remove(local_d)
            _delete(ray_d, "one")
            _deploy(ray_d, "two", 2)
            two = _images_per_s(ray_d, "two", 8, requests)
            _delete(ray_d, "two")
        finally:
            for d in daemons:
                d.stop()
            cluster.shutdown()
            if saved is None:
                os.environ.pop("SDMAKER_HOME", None)
            else:
                os.environ["SDMAKER_HOME"] = saved
    cores = os.cpu_count()
    load = "load average {:.1f}/{:.1f} on {} cores".format(*os.getloadavg()[:2], cores)
    rows.append(row("scale-out mini: images/s, 2 Ray nodes vs 1 (1 CPU each, 8 clients)", two, one, "img/s",
                    f"{requests} requests, mini's default recipe (64x64, 10 steps), step batching off; both nodes, the daemon and the client share this machine's "
                    f"{cores} cores (target on separate machines: >= 1.8x); {load}", lower_is_better=False))
    rows.append(row("scale-out: per-request latency, Ray backend vs local backend (mini, 1 client)",
                    ray_latency * 1000, local_latency * 1000, "ms",
                    f"medians of {latency_n}, requests alternating between the two daemons; overhead {100 * (ray_latency / local_latency - 1):+.1f}% "
                    f"(Serve handle + replica actor hop; target <= 5%); {load}"))
    rows.append(row("scale-out: create -> InService on Ray (mini, 1 replica)", create_s, None, "s",
                    "model fetched to the node by digest over HTTP, worker started on the node"))
    return rows
