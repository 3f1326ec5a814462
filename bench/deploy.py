"""Deploy benchmark: create -> InService time, and the daemon's serving overhead over the bare engine.

* Deploy time: a real ``sdmaker up`` daemon (own temp SDMAKER_HOME, free 127.0.0.1 port); CreateModel +
  CreateEndpointConfig + CreateEndpoint through boto3, then DescribeEndpoint polled every 50 ms until
  InService. Baseline: the seed article's "about 8 minutes" for ``HuggingFaceModel.deploy`` on SageMaker.
  Models: the tiny test model, and the largest local one (quick: the built-in ``mini`` model, or
  ``minilm-tiny`` while its weights are not committed; full: the SD 2.1-size random-weight folder that
  ``bench/engine.py`` caches). The daemon keeps a warm standby worker (torch/diffusers already imported,
  ``SDMAKER_STANDBY_WORKERS``); each deploy starts once a standby is ready, as on a daemon that has been
  up for more than a few seconds, and the row's notes say whether the worker came from it.
* Cold start, standby vs fresh: the same ``largest`` model deployed on a second daemon with
  ``SDMAKER_STANDBY_WORKERS=0`` (the worker imports torch/diffusers itself: the pre-standby behaviour).
* Serving overhead: the same request (tiny model, 64x64, 4 steps, fixed seed, base64 JPEG answer) sent
  through the daemon with boto3 ``invoke_endpoint`` vs ``sdmaker.engine.generate`` + JPEG/base64 encoding
  in this process, same run, medians. The ratio (baseline / ours, < 1) is the fraction of time left to
  the model; the absolute difference is the cost of HTTP x2, queueing and the worker hop.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import row
from bench._daemon import BenchDaemon, free_port

__all__ = ["run"]

#: The seed article: "deploying an endpoint ... about 8 minutes" (shared/seed/DIGEST.md).
SAGEMAKER_DEPLOY_S = 8 * 60.0
_REQUEST = {"prompt": "a red circle on a white background", "height": 64, "width": 64, "num_inference_steps": 4,
            "seed": 1}


def _deploy_seconds(d: BenchDaemon, name: str, model: str, env: dict[str, str] | None = None) -> tuple[float, dict[str, Any]]:
    """Seconds from CreateModel to InService (raises with the FailureReason when it fails)."""
    sm = d.client("sagemaker")
    started = time.perf_counter()
    sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                    PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": model, "Environment": {
                        "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "900", **(env or {})}})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1, "InstanceType": "ml.m5.xlarge"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    while True:
        desc = sm.describe_endpoint(EndpointName=name)
        if desc["EndpointStatus"] != "Creating":
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    if desc["EndpointStatus"] != "InService":
        raise RuntimeError(f"endpoint {name} {desc['EndpointStatus']}: {desc.get('FailureReason')}")
    import httpx

    details = httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}", timeout=10).json()
    return elapsed, details


def _start_note(details: dict[str, Any]) -> str:
    """How the endpoint's worker started: warm standby or fresh process, and its model load time."""
    w = details["workers"][0]
    how = "warm standby" if w.get("standby") else "fresh worker process"
    return f"{how}, model load {w.get('load_seconds') or 0:.2f} s"


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def _model_size_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def _largest_model(quick: bool, tmp: Path) -> tuple[str, str] | None:
    """(reference, description) of the largest local model this benchmark may use."""
    if not quick:
        from bench.engine import sd21_dir

        path = sd21_dir()
        return str(path), f"SD 2.1-size random weights, {_model_size_gib(path):.2f} GiB fp32"
    from sdmaker.models import BUILTIN_NAMES, assemble_builtin, is_builtin_ready

    for name in BUILTIN_NAMES:
        if is_builtin_ready(name):
            path = assemble_builtin(name, tmp / f"builtin-{name}")
            return str(path), f"built-in model {name!r}, {_model_size_gib(path) * 1024:.0f} MiB"
    from sdmaker.engine import build_random_pipeline

    # no trained built-in yet: the largest model that builds in seconds (pretrained MiniLM text encoder)
    path = build_random_pipeline("minilm-tiny", tmp / "minilm-tiny")
    return str(path), f"minilm-tiny (pretrained MiniLM text encoder), {_model_size_gib(path) * 1024:.0f} MiB"


def _serving_overhead(d: BenchDaemon, name: str, model_dir: Path, repeat: int) -> dict[str, float]:
    """Best and median ms of the same request through the daemon and in-process.

    The best-of-N is the headline: on a shared machine, other processes only ever add time, so the
    minimum is the closest estimate of each path's own cost; medians go in the notes.
    """
    from sdmaker.engine import encode_image_base64, generate, load_model
    from sdmaker.schema import parse_request

    rt = d.client("sagemaker-runtime")
    body = json.dumps(_REQUEST)

    def via_daemon() -> None:
        out = json.loads(rt.invoke_endpoint(EndpointName=name, Body=body, ContentType="application/json")["Body"].read())
        assert len(out["generated_images"]) == 1

    import torch

    torch.set_num_threads(1)  # as the endpoint's worker (OMP_NUM_THREADS=1)
    model = load_model(model_dir)
    request = parse_request(dict(_REQUEST))

    def in_process() -> None:
        result = generate(model, request)
        json.dumps({"generated_images": [encode_image_base64(img.image, fmt="jpeg") for img in result.images]})

    import httpx

    # the daemon's workers answer /invocations only to the daemon (per-worker secret): time the same worker
    # code started standalone, as `sdmaker serve` runs it (open on loopback), with the endpoint's settings
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "sdmaker", "serve", str(model_dir),
                               "--port", str(port)], env={**os.environ, "OMP_NUM_THREADS": "1",
                                                          "MKL_NUM_THREADS": "1", "SDMAKER_MAX_BATCH": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def direct_to_worker() -> None:
        reply = httpx.post(f"http://127.0.0.1:{port}/invocations", content=body, timeout=900,
                           headers={"Content-Type": "application/json", "Accept": "application/json"})
        assert reply.status_code == 200

    times: dict[str, list[float]] = {"daemon": [], "engine": [], "worker": []}
    paths = {"daemon": via_daemon, "engine": in_process, "worker": direct_to_worker}
    try:
        deadline = time.monotonic() + 600
        while worker.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        for fn in paths.values():  # warm every path
            fn()
        for _ in range(repeat):  # interleaved, so background load hits every path alike
            for key, fn in paths.items():
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    out = {}
    for key, values in times.items():
        out[f"{key}_min"] = min(values) * 1000
        out[f"{key}_median"] = statistics.median(values) * 1000
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    from sdmaker.engine import build_random_pipeline

    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sdmaker-bench-deploy-"))
    d = None
    try:
        tiny = build_random_pipeline("sd1-tiny", tmp / "sd1-tiny")
        largest = _largest_model(quick, tmp)
        d = BenchDaemon(tmp / "home")
        d.wait_standby()
        # one torch thread on both sides of the overhead comparison: on a shared machine, 2-thread OpenMP
        # timings of the same call vary 5-50x (threads spin-waiting for a descheduled sibling); step
        # batching off, so the worker runs the same generate() as the in-process side
        seconds, details = _deploy_seconds(d, "bench-tiny", str(tiny), {"OMP_NUM_THREADS": "1",
                                                                        "SDMAKER_MAX_BATCH": "0"})
        rows.append(row("deploy: create -> InService, tiny SD1 model", seconds, SAGEMAKER_DEPLOY_S, "s",
                        f"1 worker, {_start_note(details)}; {_load_note()}; baseline = the seed's ~8 min "
                        "SageMaker deploy (ml.g4dn.xlarge)"))
        standby_s: float | None = None
        if largest is not None:
            ref, what = largest
            d.wait_standby()  # the one bench-tiny used is replaced once that worker loaded
            standby_s, details = _deploy_seconds(d, "bench-large", ref)
            warm_note = _start_note(details)
            rows.append(row("deploy: create -> InService, largest local model", standby_s, SAGEMAKER_DEPLOY_S, "s",
                            f"{what}; {warm_note}; {_load_note()}; baseline = the seed's ~8 min SageMaker deploy"))
            d.client("sagemaker").delete_endpoint(EndpointName="bench-large")
        repeat = 10 if quick else 30
        d.wait_standby()  # its replacement's imports would otherwise run during the timed requests
        t = _serving_overhead(d, "bench-tiny", tiny, repeat=repeat)
        rows.append(row("serving: invoke via daemon vs engine in-process (tiny, 64x64, 4 steps)", t["daemon_min"],
                        t["engine_min"], "ms",
                        f"best of {repeat}, same request, interleaved, 1 torch thread each; difference "
                        f"{t['daemon_min'] - t['engine_min']:.1f} ms per request (boto3 + 2 HTTP hops + worker process "
                        f"+ JSON/base64); medians {t['daemon_median']:.0f} vs {t['engine_median']:.0f} ms"))
        rows.append(row("serving: daemon hop (boto3 -> daemon -> worker) vs POST to the worker directly", t["daemon_min"],
                        t["worker_min"], "ms",
                        f"same worker process, best of {repeat}: the daemon itself adds "
                        f"{t['daemon_min'] - t['worker_min']:.1f} ms; medians {t['daemon_median']:.0f} vs "
                        f"{t['worker_median']:.0f} ms"))
        d.stop()
        d = None
        if largest is not None and standby_s is not None:
            ref, what = largest
            d = BenchDaemon(tmp / "home-fresh", env={"SDMAKER_STANDBY_WORKERS": "0"})
            fresh_s, details = _deploy_seconds(d, "bench-large-fresh", ref)
            rows.append(row("deploy: cold start, warm standby vs fresh worker (largest local model)", standby_s,
                            fresh_s, "s",
                            f"{what}; ours = {warm_note}; baseline = SDMAKER_STANDBY_WORKERS=0, "
                            f"{_start_note(details)} (imports torch/diffusers first); {_load_note()}"))
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
