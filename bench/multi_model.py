"""Multi-model endpoint benchmark: a cold ``TargetModel`` load vs a warm hit (issue 16).

A real ``sdmaker up`` daemon with its built-in S3 holds two copies of the built-in ``mini`` model as
``a.tar.gz`` and ``b.tar.gz`` under one prefix; one endpoint (``Mode: MultiModel``) serves both, with a
memory budget (``SDMAKER_MME_MEMORY_MB``) that fits one loaded model only. The same request (64x64, 2 steps,
fixed seed) is timed through boto3 ``invoke_endpoint``:

* cold: the first request for ``a.tar.gz`` (download from S3 and safe extraction into the store, a worker
  process for it, from the warm standby when one is ready, then the generation);
* warm: the median of 5 more requests for ``a.tar.gz`` (a cache hit: the generation alone);
* reload after eviction: ``b.tar.gz`` evicts ``a.tar.gz``, then ``a.tar.gz`` again: a worker start without
  the download (the store keeps the extracted artifact, as AWS keeps it on the instance's disk).

The notes break the cold request down with the endpoint's own MME metrics (ModelDownloadingTime,
ModelLoadingTime, ModelUnloadingTime).
"""

from __future__ import annotations

import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import row
from bench._daemon import BenchDaemon

__all__ = ["run"]

_REQUEST = {"prompt": "a red circle on a white background", "height": 64, "width": 64, "num_inference_steps": 2,
            "seed": 1}
_WARM_REPEAT = 5


def _tar(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        for item in sorted(folder.iterdir()):
            tar.add(item, arcname=item.name)
    return out


def _invoke(rt: Any, target: str) -> float:
    started = time.perf_counter()
    reply = rt.invoke_endpoint(EndpointName="bench-mme", Body=json.dumps(_REQUEST), ContentType="application/json",
                               TargetModel=target)
    assert len(json.loads(reply["Body"].read())["generated_images"]) == 1
    return time.perf_counter() - started


def run(quick: bool) -> list[dict[str, Any]]:
    import boto3
    import httpx

    from sdmaker.models import assemble_builtin, is_builtin_ready
    from sdmaker.serving.daemon._admission import worker_memory_floor

    if not is_builtin_ready("mini"):
        return [row("multi-model: SKIPPED", None, None, "", "the built-in mini model's weights are not installed")]
    with tempfile.TemporaryDirectory(prefix="bench-mme-") as tmp_name:
        tmp = Path(tmp_name)
        mini = assemble_builtin("mini", tmp / "mini")
        archive = _tar(mini, tmp / "model.tar.gz")
        budget_mb = int(1.5 * worker_memory_floor(mini, "auto") / 2**20)  # one loaded model fits, not two
        # no S3 of the user's own: the daemon serves S3 itself and reads the artifacts from it
        saved = {k: os.environ.pop(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if k in os.environ}
        try:
            d = BenchDaemon(tmp / "home", env={"AWS_CONFIG_FILE": str(tmp / "no-aws-config")})
        finally:
            os.environ.update(saved)
        try:
            s3 = boto3.client("s3", endpoint_url=d.url + "/s3", region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")
            s3.create_bucket(Bucket="bench-mme")
            for key in ("a.tar.gz", "b.tar.gz"):
                s3.upload_file(str(archive), "bench-mme", f"models/{key}")
            sm, rt = d.client("sagemaker"), d.client("sagemaker-runtime")
            sm.create_model(ModelName="bench-mme", ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                            PrimaryContainer={"Image": "sdmaker", "Mode": "MultiModel",
                                              "ModelDataUrl": "s3://bench-mme/models/",
                                              "Environment": {"SDMAKER_MME_MEMORY_MB": str(budget_mb),
                                                              "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "600",
                                                              "SDMAKER_MME_LOAD_WAIT": "600"}})
            sm.create_endpoint_config(EndpointConfigName="bench-mme", ProductionVariants=[{
                "VariantName": "AllTraffic", "ModelName": "bench-mme", "InitialInstanceCount": 1,
                "InstanceType": "ml.m5.xlarge"}])
            sm.create_endpoint(EndpointName="bench-mme", EndpointConfigName="bench-mme")
            sm.get_waiter("endpoint_in_service").wait(EndpointName="bench-mme",
                                                      WaiterConfig={"Delay": 0.2, "MaxAttempts": 600})
            standby = d.wait_standby()  # as on a daemon that has been up for more than a few seconds
            cold = _invoke(rt, "a.tar.gz")
            details = httpx.get(f"{d.url}/sdmaker/v1/endpoints/bench-mme", timeout=10).json()["multi_model"]
            worker = details["models"][0]["workers"][0]
            metrics = dict(details["metrics"])
            warm = [_invoke(rt, "a.tar.gz") for _ in range(_WARM_REPEAT)]
            _invoke(rt, "b.tar.gz")  # evicts a (the budget holds one)
            mid = httpx.get(f"{d.url}/sdmaker/v1/endpoints/bench-mme", timeout=10).json()["multi_model"]["metrics"]
            b_metrics = {"download": mid["ModelDownloadingTime"]["sum_s"] - metrics["ModelDownloadingTime"]["sum_s"],
                         "loading": mid["ModelLoadingTime"]["sum_s"] - metrics["ModelLoadingTime"]["sum_s"]}
            d.wait_standby()
            reload_s = _invoke(rt, "a.tar.gz")
            after = httpx.get(f"{d.url}/sdmaker/v1/endpoints/bench-mme", timeout=10).json()["multi_model"]["metrics"]
        finally:
            d.stop()
    warm_s = statistics.median(warm)
    load = os.getloadavg()[0]
    how = "a warm standby process" if worker.get("standby") else "a fresh worker process"
    download = metrics["ModelDownloadingTime"]["sum_s"]
    loading = metrics["ModelLoadingTime"]["sum_s"]
    unload = after["ModelUnloadingTime"]["average_s"]
    # the reload's own share of the running sums (the sums now cover a, b and the reload of a)
    reload_download = after["ModelDownloadingTime"]["sum_s"] - download - b_metrics["download"]
    reload_loading = after["ModelLoadingTime"]["sum_s"] - loading - b_metrics["loading"]
    common = f"mini 64x64, 2 steps, boto3 invoke_endpoint with TargetModel; load average {load:.1f} on {os.cpu_count()} cores"
    return [
        row("multi-model endpoint: warm TargetModel hit vs cold load (mini)", warm_s, cold, "s",
            f"cold = first request for a.tar.gz: S3 download + extraction into the store {download:.2f} s, model "
            f"load in {how} {loading:.2f} s, the rest ({cold - download - loading:.2f} s) the first generation "
            f"in a new process (lazy init) and the hops; warm = median of {_WARM_REPEAT} hits "
            f"(min {min(warm):.3f} s); standby ready before: {standby}; {common}"),
        row("multi-model endpoint: reload after eviction (store-cached) vs cold load (mini)", reload_s, cold, "s",
            f"a.tar.gz evicted by b.tar.gz (SDMAKER_MME_MEMORY_MB={budget_mb} holds one mini), then requested "
            f"again: store lookup {reload_download:.2f} s (no download), unloading b {unload:.2f} s, model load "
            f"{reload_loading:.2f} s, the rest "
            f"({reload_s - reload_download - unload - reload_loading:.2f} s) the first generation in a new process "
            f"and the hops; {common}"),
    ]
