"""Issue 11's bounded resources and backpressure: input images bounded before decoding, the admission
estimate, the memory budget and the load spread of the dispatcher."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient

from sdmaker.errors import InvalidRequestError, QueueFullError
from sdmaker.serving import HandlerService, ModelServer, WorkerConfig, create_app
from sdmaker.serving.container._codecs import MAX_INPUT_PIXELS, decode
from sdmaker.serving.daemon._admission import Admission, Work, memory_budget_pixels, work_of_body
from sdmaker.serving.daemon._pool import WorkerPool
from sdmaker.serving.daemon._worker_process import Worker, WorkerSpec, WorkerState


def _huge_png(width: int = 17000, height: int = 10000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels: a few KB on the wire."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    pixels = zlib.compress(row * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_a_huge_png_is_refused_from_its_header() -> None:
    png = _huge_png()
    assert len(png) < 200_000
    with pytest.raises(InvalidRequestError) as info:
        decode(png, "image/png")
    assert "170000000" in info.value.message and str(MAX_INPUT_PIXELS) in info.value.message


def test_a_huge_png_gets_400_from_the_worker_and_a_small_one_still_decodes(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "inference.py").write_text(
        "def model_fn(model_dir):\n    return None\n\n"
        "def predict_fn(data, model):\n    return {'size': list(data['inputs'].size)}\n")
    server = ModelServer(HandlerService(tmp_path, device="cpu"))
    assert server.load()
    client = TestClient(create_app(server), base_url="http://127.0.0.1:8080")
    reply = client.post("/invocations", content=_huge_png(), headers={"Content-Type": "image/png"})
    assert reply.status_code == 400
    assert str(MAX_INPUT_PIXELS) in reply.text
    small = client.post("/invocations", content=_huge_png(64, 32), headers={"Content-Type": "image/png"})
    assert small.status_code == 200 and small.json() == {"size": [64, 32]}


def test_an_image_just_over_the_limit_is_refused_by_its_size_before_decoding() -> None:
    with pytest.raises(InvalidRequestError) as info:  # under PIL's own 2x bomb guard: our header check
        decode(_huge_png(5000, 4000), "image/png")
    assert "5000x4000" in info.value.message and str(MAX_INPUT_PIXELS) in info.value.message


# -- the admission estimate (pure) -------------------------------------------------------------------------


def test_work_of_a_body_counts_pixels_steps_and_images_with_the_seed_defaults() -> None:
    w = work_of_body(b'{"prompt": ["a", "b"], "height": 64, "width": 128, "num_inference_steps": 10, '
                     b'"num_images_per_prompt": 3}')
    assert w.pixels == 64 * 128 * 6 and w.units == pytest.approx(64 * 128 * 6 * 10 / 1e6)
    hf = work_of_body(b'{"inputs": "a", "parameters": {"height": 256, "width": 256}}')
    assert hf.pixels == 256 * 256 and hf.units == pytest.approx(256 * 256 * 50 / 1e6)
    assert work_of_body(None).pixels == 512 * 512  # an image body: one default request


def test_an_idle_endpoint_takes_a_request_the_prior_alone_would_refuse() -> None:
    adm = Admission(prior_s_per_unit=1000.0)
    adm.check(work_of_body(b'{"prompt": "a"}'), name="e", timeout_s=1, workers=1, free_slots=1, budget_pixels=None)


def test_work_ahead_that_misses_the_timeout_is_a_503_with_retry_after() -> None:
    adm = Admission()
    one = Work(units=1.0, pixels=0, opaque=True)
    adm.taken(one)
    adm.done(one, service_s=2.0, concurrency=1)  # measured: 2 s per request on one worker
    adm.check(one, name="e", timeout_s=5, workers=1, free_slots=1, budget_pixels=None)
    adm.taken(one)  # one running, one more fits: (1 + 1) x 2 s <= 5 s
    adm.check(one, name="e", timeout_s=5, workers=1, free_slots=0, budget_pixels=None)
    adm.taken(one)
    with pytest.raises(QueueFullError) as info:  # (2 + 1) x 2 s > 5 s
        adm.check(one, name="e", timeout_s=5, workers=1, free_slots=0, budget_pixels=None)
    assert info.value.fields["retry_after"] >= 1
    # two workers halve the wait: taken again
    adm.check(one, name="e", timeout_s=5, workers=2, free_slots=0, budget_pixels=None)
    assert adm.expected_wait_s(1) == pytest.approx(4.0)


def test_step_batching_is_measured_as_throughput_not_latency() -> None:
    adm = Admission()
    w = Work(units=1.0, pixels=4096)
    adm.taken(w)
    adm.done(w, service_s=4.0, concurrency=8)  # 8 requests ran together in 4 s: 0.5 s per unit of worker time
    assert adm.s_per_unit == pytest.approx(0.5)


def test_a_request_too_large_for_the_timeout_is_refused_only_from_a_measured_rate() -> None:
    adm = Admission(prior_s_per_unit=1000.0)
    huge = work_of_body(b'{"prompt": "a", "height": 1536, "width": 1536, "num_inference_steps": 500}')
    adm.check(huge, name="e", timeout_s=60, workers=1, free_slots=1, budget_pixels=None)  # prior: never refuses
    small = work_of_body(b'{"prompt": "a", "height": 64, "width": 64, "num_inference_steps": 1}')
    adm.taken(small)
    adm.done(small, service_s=1.0, concurrency=1)  # a tiny request: its time is fixed cost, not a rate
    adm.check(huge, name="e", timeout_s=60, workers=1, free_slots=1, budget_pixels=None)
    real = work_of_body(b'{"prompt": "a", "height": 512, "width": 512, "num_inference_steps": 20}')
    adm.taken(real)
    adm.done(real, service_s=1.0 + real.units * 0.5, concurrency=1)  # 0.5 s per megapixel-step beyond it
    assert adm.fastest == pytest.approx(0.5)
    with pytest.raises(InvalidRequestError) as info:
        adm.check(huge, name="e", timeout_s=60, workers=1, free_slots=1, budget_pixels=None)
    text = info.value.message
    assert "60 s" in text and "asynchronous API" in text and "larger endpoint timeout" in text
    adm.check(small, name="e", timeout_s=60, workers=1, free_slots=1, budget_pixels=None)


def test_a_request_over_the_memory_budget_is_refused_naming_the_limit() -> None:
    body = json.dumps({"prompt": ["a", "b"], "height": 1536, "width": 1536, "num_images_per_prompt": 16}).encode()
    with pytest.raises(InvalidRequestError) as info:
        Admission().check(work_of_body(body), name="e", timeout_s=60, workers=1, free_slots=1,
                          budget_pixels=1_000_000)
    assert "1000000" in info.value.message


def test_the_memory_budget_follows_the_model_and_the_memory(sd1_dir: Path) -> None:
    small = memory_budget_pixels(sd1_dir, "fp32", 256 * 1024**2)
    large = memory_budget_pixels(sd1_dir, "fp32", 4 * 1024**3)
    assert 64 * 64 <= small < large
    assert memory_budget_pixels(sd1_dir, "fp16", 4 * 1024**3) > large  # half the bytes per pixel
    # SD's sizes (no configs): 8 GiB holds far fewer than 1536x1536 x 32 images at once
    assert memory_budget_pixels(Path("/nonexistent"), "fp32", 8 * 1024**3) < 1536 * 1536 * 32


# -- the dispatcher (pure: workers that look alive) --------------------------------------------------------


class _FakeProcessWorker(Worker):
    """A worker whose process is a stand-in: alive while its ``returncode`` is None (the real one asks the OS
    about its pid, which is no child of this test)."""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _pool(count: int, max_batch: int, budget: int | None) -> WorkerPool:
    spec = WorkerSpec(config=WorkerConfig(model_dir=Path("/m"), port=0, max_batch=max_batch,
                                                  log_file=Path("/tmp/run/w.log")), python="python",
                      run_dir=Path("/tmp/run"))
    pool = WorkerPool(spec, count, tag="t")
    for w in pool.workers:
        w.__class__ = _FakeProcessWorker
        w.proc = types.SimpleNamespace(returncode=None, pid=1)  # type: ignore[assignment]
        w.state = WorkerState.READY
    pool.budget_pixels = budget
    return pool


def test_dispatch_picks_the_least_loaded_worker_and_respects_the_memory_budget() -> None:
    async def scenario() -> None:
        pool = _pool(2, max_batch=8, budget=12288)
        first, _ = await pool._acquire(time.monotonic() + 5, 8192)
        second, _ = await pool._acquire(time.monotonic() + 5, 8192)
        assert {first.index, second.index} == {0, 1}  # spread, not both on the first free one
        assert pool._pick(8192) is None  # fits each alone, not beside what they hold: it waits
        assert pool._pick(4096) is not None  # a smaller one still fits beside
        with pytest.raises(asyncio.TimeoutError):
            await pool._acquire(time.monotonic() + 0.05, 8192)

    asyncio.run(scenario())


def test_sequential_requests_alternate_between_idle_workers() -> None:
    pool = _pool(2, max_batch=0, budget=None)
    picks = []
    for _ in range(6):
        w = pool._pick(0)
        assert w is not None
        w.take_slot()
        picks.append(w.index)
        w.release_slot(w.generation, healthy=True)
    assert picks.count(0) == 3 and picks.count(1) == 3


# -- a real daemon -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adm_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from conftest import DaemonProcess

    d = DaemonProcess(tmp_path_factory.mktemp("admission-home"), env={"SDMAKER_STANDBY_WORKERS": "0"}).start()
    yield d
    d.stop()


def _details(d, name: str) -> dict:  # type: ignore[no-untyped-def]
    return httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}").json()


def _invoke_all(d, name: str, bodies: list[bytes]) -> list[dict]:  # type: ignore[no-untyped-def]
    """Send ``bodies`` at once; each outcome: {"status": HTTP status, "headers": ..., "code": AWS code}."""
    rt = d.boto("sagemaker-runtime")

    def one(body: bytes) -> dict:
        try:
            reply = rt.invoke_endpoint(EndpointName=name, Body=body, ContentType="application/json")
            reply["Body"].read()
            return {"status": 200, "headers": reply["ResponseMetadata"]["HTTPHeaders"], "code": None}
        except ClientError as exc:
            meta = exc.response["ResponseMetadata"]
            return {"status": meta["HTTPStatusCode"], "headers": meta["HTTPHeaders"],
                    "code": exc.response["Error"]["Code"], "message": exc.response["Error"].get("Message", "")}

    with ThreadPoolExecutor(len(bodies)) as ex:
        return list(ex.map(one, bodies))


def test_two_workers_both_get_work(adm_daemon, scripted_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    desc = adm_daemon.deploy("adm-spread", scripted_model_dir, count=2)
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    outcomes = _invoke_all(adm_daemon, "adm-spread", [b'{"sleep": 0.2}'] * 8)
    assert [o["status"] for o in outcomes] == [200] * 8
    served = [w["served"] for w in _details(adm_daemon, "adm-spread")["workers"]]
    assert sum(served) == 8 and min(served) >= 2, served


def test_overload_is_an_immediate_503_with_retry_after(adm_daemon, scripted_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    desc = adm_daemon.deploy("adm-busy", scripted_model_dir, env={"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "5"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    assert _invoke_all(adm_daemon, "adm-busy", [b'{"sleep": 2}'])[0]["status"] == 200  # measures >= 2 s each
    outcomes = _invoke_all(adm_daemon, "adm-busy", [b'{"sleep": 2}'] * 6)
    statuses = sorted(o["status"] for o in outcomes)
    assert 424 not in statuses, outcomes  # nobody waited out the timeout
    refused = [o for o in outcomes if o["status"] == 503]
    assert refused and statuses.count(200) >= 1, statuses
    for o in refused:
        assert o["code"] == "ServiceUnavailable" and int(o["headers"]["retry-after"]) >= 1
    info = _details(adm_daemon, "adm-busy")
    assert info["expected_wait_s"] == 0 and info["queue_depth"] == 0 and info["seconds_per_unit"] >= 2
    text = httpx.get(adm_daemon.url + "/metrics").text
    assert 'sdmaker_expected_wait_seconds{endpoint="adm-busy"}' in text


def test_memory_budget_refuses_the_huge_and_serialises_what_does_not_fit_together(  # type: ignore[no-untyped-def]
        adm_daemon, sd1_dir: Path) -> None:
    desc = adm_daemon.deploy("adm-mem", sd1_dir, env={"SDMAKER_MEMORY_BUDGET_PIXELS": "12288",
                                                      "SDMAKER_MAX_BATCH": "8",
                                                      "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "600"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    assert _details(adm_daemon, "adm-mem")["memory_budget_pixels"] == 12288
    huge = json.dumps({"prompt": ["a", "b"], "height": 1536, "width": 1536, "num_images_per_prompt": 16,
                       "num_inference_steps": 2}).encode()
    [refused] = _invoke_all(adm_daemon, "adm-mem", [huge])
    assert refused["status"] == 400 and refused["code"] == "ValidationError" and "12288" in refused["message"]
    pair = json.dumps({"prompt": "a", "height": 64, "width": 64, "num_images_per_prompt": 2,
                       "num_inference_steps": 4}).encode()  # 8192 pixels each: one fits, two do not
    outcomes = _invoke_all(adm_daemon, "adm-mem", [pair, pair, pair])
    assert [o["status"] for o in outcomes] == [200] * 3, outcomes
    [worker] = _details(adm_daemon, "adm-mem")["workers"]
    assert worker["peak_in_flight"] == 1  # batching of 8 is on, but the budget let only one in at a time


def test_a_small_request_beside_a_huge_one_is_judged_by_its_fair_share_not_the_whole_backlog() -> None:
    """The step batcher gives size groups turns by work: a small request that gets a free slot finishes in
    about BATCH_SIZE_GROUPS times its own time, however large the request already running (issue 11)."""
    import inspect

    from sdmaker.engine import StepBatcher
    from sdmaker.serving.daemon._admission import BATCH_SIZE_GROUPS, Admission, Work

    assert inspect.signature(StepBatcher).parameters["max_groups"].default == BATCH_SIZE_GROUPS
    adm = Admission()
    adm.done(Work(units=1.0, pixels=4096), service_s=1.0, concurrency=1.0)  # measured: 1 s per unit
    huge = Work(units=50.0, pixels=1024 * 1024)
    adm.taken(huge)
    small = Work(units=1.0, pixels=4096)
    adm.check(small, name="ep", timeout_s=10, workers=1, free_slots=7, budget_pixels=None,
              share=BATCH_SIZE_GROUPS)  # ~4 s with fair turns: taken
    with pytest.raises(QueueFullError):  # first come, first served: 51 s behind the huge one
        adm.check(small, name="ep", timeout_s=10, workers=1, free_slots=7, budget_pixels=None, share=1)
    with pytest.raises(QueueFullError):  # no free slot: it queues behind everything
        adm.check(small, name="ep", timeout_s=10, workers=1, free_slots=0, budget_pixels=None,
                  share=BATCH_SIZE_GROUPS)


def test_edit_work_takes_the_image_size_and_strength() -> None:
    import base64
    import io

    from PIL import Image

    from sdmaker.serving.daemon._admission import work_of_body

    buf = io.BytesIO()
    Image.new("RGB", (1024, 768)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode("ascii")
    work = work_of_body(json.dumps({"prompt": "x", "image": image, "num_inference_steps": 20,
                                    "strength": 0.5}).encode())
    assert work.pixels == 1024 * 768 and work.units == 1024 * 768 * 10 / 1e6
