"""Batch transform benchmark (issue 13): a transform job of N prompts vs N sequential InvokeEndpoint calls.

Both sides run in one ``sdmaker up`` (its own temp ``SDMAKER_HOME``) on the built-in ``mini`` model with the
same N request bodies (same seeds, mini's own default size and steps), one worker each, one torch thread
each (on a shared machine 2-thread OpenMP timings of the same call vary many-fold, bench/deploy.py):

* baseline -- an endpoint, and N ``InvokeEndpoint`` calls one after the other (a client that loops over its
  prompts), timed from the first call to the last answer;
* ours -- ``CreateTransformJob`` over one JSON Lines file of the same N bodies (``SplitType: Line``), timed
  from the create call until ``DescribeTransformJob`` says ``Completed``: the job's own worker start
  (from a warm standby, as endpoints start), S3 reads and the ``.out`` upload are all inside the figure.
  The container's ``/execution-parameters`` makes the job send single records, 8 at a time, which the
  worker's step batcher runs together.

S3 is a moto server (``python -m moto.server``) on a free loopback port, reached through
``AWS_ENDPOINT_URL_S3`` exactly as a real S3 would be. Target: ratio >= 1.6 (images/s).

``python -m bench --only transform [--quick]``; ``python -m bench.transform --quick`` prints the row.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import row
from bench._daemon import BenchDaemon, free_port

__all__ = ["run"]

TARGET_RATIO = 1.6
_ROLE = "arn:aws:iam::111122223333:role/sm"


@contextlib.contextmanager
def _moto(log: Path) -> Any:
    """A moto S3 server on a free loopback port; yields its URL."""
    import httpx

    port = free_port()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/moto-api/", timeout=1).status_code < 500:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start; see {log}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _bodies(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"a red circle above a blue square {i}", "seed": 1000 + i} for i in range(n)]


def measure(model: str, n: int, tmp: Path) -> dict[str, Any]:
    """Seconds for ``n`` sequential invocations and for a transform job of the same ``n`` bodies."""
    import boto3

    bodies = _bodies(n)
    with _moto(tmp / "moto.log") as s3_url:
        env = {"AWS_ENDPOINT_URL_S3": s3_url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "SDMAKER_MAX_QUEUE": "1000"}
        d = BenchDaemon(tmp / "home", env=env)
        try:
            d.wait_standby()
            sm, rt = d.client("sagemaker"), d.client("sagemaker-runtime")
            s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")
            s3.create_bucket(Bucket="bench")
            s3.put_object(Bucket="bench", Key="in/prompts.jsonl",
                          Body=b"".join(json.dumps(b).encode() + b"\n" for b in bodies))
            sm.create_model(ModelName="mini", ExecutionRoleArn=_ROLE, PrimaryContainer={
                "Image": "sdmaker", "ModelDataUrl": model,
                "Environment": {"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "900", "OMP_NUM_THREADS": "1"}})
            sm.create_endpoint_config(EndpointConfigName="mini", ProductionVariants=[{
                "VariantName": "AllTraffic", "ModelName": "mini", "InitialInstanceCount": 1,
                "InstanceType": "ml.m5.xlarge"}])
            sm.create_endpoint(EndpointName="mini", EndpointConfigName="mini")
            sm.get_waiter("endpoint_in_service").wait(EndpointName="mini", WaiterConfig={"Delay": 0.2,
                                                                                          "MaxAttempts": 3000})
            rt.invoke_endpoint(EndpointName="mini", Body=json.dumps(bodies[0]), ContentType="application/json")
            started = time.perf_counter()
            for body in bodies:
                reply = rt.invoke_endpoint(EndpointName="mini", Body=json.dumps(body), ContentType="application/json")
                json.loads(reply["Body"].read())
            sequential_s = time.perf_counter() - started
            sm.delete_endpoint(EndpointName="mini")  # the job gets the machine to itself, as the loop had it
            d.wait_standby()
            started = time.perf_counter()
            sm.create_transform_job(
                TransformJobName="bench", ModelName="mini",
                TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                                "S3Uri": "s3://bench/in/prompts.jsonl"}},
                                "ContentType": "application/json", "SplitType": "Line"},
                TransformOutput={"S3OutputPath": "s3://bench/out", "AssembleWith": "Line",
                                 "Accept": "application/json"},
                TransformResources={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1})
            while True:
                desc = sm.describe_transform_job(TransformJobName="bench")
                if desc["TransformJobStatus"] not in ("InProgress", "Stopping"):
                    break
                time.sleep(0.1)
            transform_s = time.perf_counter() - started
            if desc["TransformJobStatus"] != "Completed":
                raise RuntimeError(f"transform job {desc['TransformJobStatus']}: {desc.get('FailureReason')}")
            lines = s3.get_object(Bucket="bench", Key="out/prompts.jsonl.out")["Body"].read().splitlines()
            seeds = [json.loads(line)["seeds"][0] for line in lines]
            if seeds != [b["seed"] for b in bodies]:
                raise RuntimeError("transform output is not in input order")
            log = (tmp / "home" / "endpoints" / "transform-jobs" / "bench" / "job.log").read_text()
            params = next((ln.split("execution parameters: ", 1)[1].split(" (", 1)[0]
                           for ln in log.splitlines() if "execution parameters: " in ln), "?")
        finally:
            d.stop()
    return {"sequential_s": sequential_s, "transform_s": transform_s, "params": params}


def run(quick: bool) -> list[dict[str, Any]]:
    from bench.batching import mini_model_dir

    n = 64
    tmp = Path(tempfile.mkdtemp(prefix="sdmaker-bench-transform-"))
    load_before = os.getloadavg()[0]
    try:
        path, label = mini_model_dir()
        m = measure(str(path), n, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours, base = n / m["transform_s"], n / m["sequential_s"]
    return [row(f"batch transform of {n} prompts on mini vs {n} sequential InvokeEndpoint calls", ours, base, "img/s",
                f"{label}, its default size and steps, 1 worker with 1 torch thread each side; ours {m['transform_s']:.1f} s from CreateTransformJob to "
                f"Completed (worker start, S3 in/out included; {m['params']}), baseline {m['sequential_s']:.1f} s "
                f"for the loop of calls on a warm endpoint; load average {load_before:.1f}->{os.getloadavg()[0]:.1f} "
                f"on {os.cpu_count()} cores; target ratio >= {TARGET_RATIO}")]


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        print(r)
