"""Progress benchmark: what previews cost per step, and how soon a client sees progress.

* Preview cost: the built-in ``mini`` (64x64, its own 10 steps; quick: fewer repeats) generated in this process
  with an ``on_progress`` callback that does what a worker does with each report (a ``step`` event, and for
  previews a JPEG encode of each image), without previews (baseline) and with the cheap ``approx`` preview on
  every step (ours), interleaved, medians of CPU seconds per step (the process's CPU time: a busy shared
  machine stretches wall time far more than CPU time). Target: <= 3% more. The note adds the same for a
  full ``vae`` decode every step, for scale.
* Time to first progress: a real daemon with an idle ``mini`` endpoint; ``InvokeEndpointWithResponseStream``
  over HTTP, the time from sending the request to the first ``step`` line (the first denoising step is done),
  median over the runs; the note gives the time to the first line of any kind (``queued``). Target: <= 100 ms.
  The baseline is the time to the whole answer of the same request: what a client waited before it saw anything.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import row
from bench._daemon import BenchDaemon

__all__ = ["preview_cost", "run"]

_REQUEST: dict[str, Any] = {"prompt": "a red circle on a white background", "height": 64, "width": 64, "seed": 3}


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def _worker_like_callback() -> Any:
    """A progress callback that does a worker's work per report: the step event's data, JPEG-encoded previews."""
    from PIL import Image

    def on_progress(progress: Any) -> None:
        json.dumps(progress.to_dict())
        for array in progress.previews or ():
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, format="JPEG", quality=80)

    return on_progress


def preview_cost(quick: bool, *, repeats: int | None = None, steps: int = 10) -> list[dict[str, Any]]:
    """The preview-cost row (``repeats``/``steps``: smaller for the smoke test)."""
    from bench.batching import mini_model_dir
    from sdmaker.engine import generate, load_model
    from sdmaker.schema import GenerateRequest, PreviewKind

    folder, label = mini_model_dir()
    model = load_model(folder, dtype="fp32", device="cpu")
    callback = _worker_like_callback()
    kinds: tuple[PreviewKind, ...] = ("none", "approx", "vae")
    per_step: dict[str, list[float]] = {k: [] for k in kinds}
    repeats = repeats or (3 if quick else 20)
    for k in kinds:  # warm-up (and the first-use fit, which mini does not need: it ships its factors)
        generate(model, GenerateRequest(**_REQUEST, num_inference_steps=2, preview=k, preview_every=1),
                 on_progress=callback)
    for _ in range(repeats):
        for k in kinds:
            request = GenerateRequest(**_REQUEST, num_inference_steps=steps, preview=k, preview_every=1)
            started = time.process_time()  # CPU time of this process: steadier than wall time on a shared machine
            generate(model, request, on_progress=callback)
            per_step[k].append((time.process_time() - started) / steps)
    none, approx, vae = (statistics.median(per_step[k]) for k in kinds)
    extra = (approx / none - 1) * 100
    return [row("previews: step time with the approx preview every step", approx, none, "s/step",
                f"{label} 64x64, {steps} steps, preview + JPEG encode per step, process CPU seconds, median of "
                f"{repeats} interleaved runs: {extra:+.1f}% vs no preview (target <= 3%); a full VAE decode every step instead: "
                f"{(vae / none - 1) * 100:+.1f}%; {_load_note()}")]


def _deploy(d: BenchDaemon, name: str) -> None:
    sm = d.client("sagemaker")
    sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                    PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": "mini", "Environment": {
                        "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "600"}})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1, "InstanceType": "ml.m5.xlarge"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    while (desc := sm.describe_endpoint(EndpointName=name))["EndpointStatus"] == "Creating":
        time.sleep(0.05)
    if desc["EndpointStatus"] != "InService":
        raise RuntimeError(f"endpoint {name} {desc['EndpointStatus']}: {desc.get('FailureReason')}")


def _first_progress(quick: bool) -> list[dict[str, Any]]:
    import httpx
    from botocore.eventstream import EventStreamBuffer

    runs = 5 if quick else 30
    first_any: list[float] = []
    first_step: list[float] = []
    whole: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sdmaker-bench-progress-") as tmp:
        d = BenchDaemon(Path(tmp) / "home")
        try:
            d.wait_standby()
            _deploy(d, "bench-progress")
            url = f"{d.url}/endpoints/bench-progress/invocations-response-stream"
            with httpx.Client(timeout=300) as client:
                for i in range(runs + 1):  # the first one warms the worker up
                    body = json.dumps({**_REQUEST, "seed": i}).encode()
                    started = time.perf_counter()
                    seen_any = seen_step = None
                    with client.stream("POST", url, content=body, headers={"Content-Type": "application/json"}) as r:
                        buffer = EventStreamBuffer()
                        for data in r.iter_raw():
                            buffer.add_data(data)
                            for message in buffer:
                                now = time.perf_counter() - started
                                seen_any = seen_any if seen_any is not None else now
                                if seen_step is None and message.payload.startswith(b'{"type":"step"'):
                                    seen_step = now
                    done = time.perf_counter() - started
                    if i and seen_any is not None and seen_step is not None:
                        first_any.append(seen_any)
                        first_step.append(seen_step)
                        whole.append(done)
        finally:
            d.stop()
    step_ms = statistics.median(first_step) * 1e3
    return [row("progress: request to first step event (idle mini endpoint)", step_ms,
                statistics.median(whole) * 1e3, "ms",
                f"InvokeEndpointWithResponseStream over HTTP, 64x64, the model's 10 steps, median of {len(first_step)}; "
                f"first event of any kind (queued) after {statistics.median(first_any) * 1e3:.1f} ms; target <= 100 ms; "
                f"baseline = the whole answer (all a client saw before); {_load_note()}")]


def run(quick: bool) -> list[dict[str, Any]]:
    return preview_cost(quick) + _first_progress(quick)
