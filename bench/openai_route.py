"""The OpenAI Images API's overhead against InvokeEndpoint on the same request (target: at most 3 %).

One daemon, one ``mini`` endpoint; the same generation (64x64, the model's 10 steps (2 with ``--quick``), fixed seed, JSON
answer with base64 images) is sent alternately as ``POST /endpoints/{name}/invocations`` and as
``POST /v1/images/generations`` with the same plain HTTP client (no SigV4 on loopback, no SDK parsing), so
the difference is the route itself: the OpenAI validation and mapping, the job's event log and the
re-shaped answer. Medians of interleaved pairs, after warm-up.

``python -m bench --only openai_route [--quick]``; ``python -m bench.openai_route --quick`` prints the rows.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import row
from bench._daemon import BenchDaemon

TARGET_OVERHEAD = 0.03
_REQUEST = {"prompt": "a red ball on green grass", "width": 64, "height": 64, "seed": 42, "format": "png"}


def _deploy(d: BenchDaemon, name: str) -> None:
    sm = d.client("sagemaker")
    sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::111122223333:role/bench",
                    PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": "mini"})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sm.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 900})


def run(quick: bool) -> list[dict[str, Any]]:
    import httpx

    pairs, steps, warmup = (6, 2, 1) if quick else (30, 10, 2)  # quick: a short request, so the overhead shows more
    tmp = Path(tempfile.mkdtemp(prefix="sdmaker-bench-openai-"))
    d: BenchDaemon | None = None
    try:
        d = BenchDaemon(tmp / "home", env={"SDMAKER_INVOCATION_TIMEOUT": "600"})
        d.wait_standby()
        _deploy(d, "oa-mini")
        invoke_url = f"{d.url}/endpoints/oa-mini/invocations"
        openai_url = f"{d.url}/v1/images/generations"
        invoke_body = json.dumps({**_REQUEST, "num_inference_steps": steps}).encode()
        openai_body = json.dumps({"model": "oa-mini", "prompt": _REQUEST["prompt"], "size": "64x64", "seed": 42,
                                  "output_format": "png", "num_inference_steps": steps}).encode()
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=600) as http:
            def once(url: str, body: bytes) -> float:
                started = time.perf_counter()
                answer = http.post(url, content=body, headers=headers)
                elapsed = time.perf_counter() - started
                answer.raise_for_status()
                return elapsed

            for _ in range(warmup):  # warm-up: first requests compile and fill caches
                once(invoke_url, invoke_body)
                once(openai_url, openai_body)
            invoke_s, openai_s = [], []
            for i in range(pairs):  # interleaved, alternating which goes first
                order = [(invoke_url, invoke_body, invoke_s), (openai_url, openai_body, openai_s)]
                for url, body, out in (order if i % 2 == 0 else order[::-1]):
                    out.append(once(url, body))
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    base, ours = statistics.median(invoke_s), statistics.median(openai_s)
    overhead = ours / base - 1
    verdict = "meets" if overhead <= TARGET_OVERHEAD else "misses"
    return [row(f"OpenAI images route vs InvokeEndpoint (mini 64x64, {steps} steps, same request)", ours, base, "s",
                f"median of {pairs} interleaved pairs; overhead {overhead * 100:+.1f}% ({verdict} the <= 3% target); "
                f"load average {load:.1f} on {os.cpu_count()} cores")]


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
