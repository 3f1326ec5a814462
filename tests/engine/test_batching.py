"""StepBatcher: batched outputs equal solo outputs, per-request state, FIFO bounds, errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sdmaker.engine import StepBatcher, generate, generate_fast, load_model
from sdmaker.errors import EngineError, GenerationCancelledError, InvocationTimeoutError, QueueFullError
from sdmaker.schema import GenerateRequest


@pytest.fixture(scope="module")
def model(sd1_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(sd1_dir, dtype="fp32")  # exact comparisons below are fp32 facts


def _req(i: int, **kw: object) -> GenerateRequest:
    base: dict[str, object] = {
        "prompt": f"a red circle {i}", "height": 64, "width": 64, "num_inference_steps": 2 + i % 3, "seed": 100 + i,
        "scheduler": ("ddim", "euler_a", "dpmpp_2m", "pndm", "unipc", "euler")[i % 6],
        "guidance_scale": 1.0 if i % 4 == 0 else 7.5, "num_images_per_prompt": 1 + i % 2,
    }
    base.update(kw)
    return GenerateRequest(**base)


def _pixels(result) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([np.asarray(img.image, dtype=np.int16) for img in result.images])


def test_generate_fast_without_overrides_is_generate(model) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        req = _req(i, negative_prompt="blurry").resolve(model.defaults)
        ours, ref = generate_fast(model, req), generate(model, req)
        assert ours.seeds == ref.seeds and ours.scheduler == ref.scheduler
        assert np.array_equal(ours.arrays, ref.arrays)  # type: ignore[arg-type]


def test_concurrent_batched_equals_solo(model) -> None:  # type: ignore[no-untyped-def]
    reqs = [_req(i).resolve(model.defaults) for i in range(8)]
    solo = [generate_fast(model, r) for r in reqs]
    results: list[object] = [None] * len(reqs)
    steps: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(reqs))}
    with StepBatcher(model, max_batch=6) as batcher:
        def run(i: int) -> None:
            results[i] = batcher.submit(reqs[i], on_step=lambda s, t, i=i: steps[i].append((s, t)))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = batcher.stats
    assert stats.completed == len(reqs)
    assert stats.steps < sum(len(s) for s in steps.values())  # steps really were shared
    assert stats.max_rows <= 2 * 6
    for i, (a, b) in enumerate(zip(solo, results, strict=True)):
        assert b.seeds == a.seeds and b.request == a.request  # type: ignore[attr-defined]
        assert float(np.abs(a.arrays - b.arrays).max()) <= 1e-4  # type: ignore[attr-defined]
        total = len(steps[i])
        assert [s for s, _ in steps[i]] == list(range(1, total + 1))
        assert total == steps[i][-1][1]


def test_fifo_admission_and_sizes(model) -> None:  # type: ignore[no-untyped-def]
    order: list[int] = []
    with StepBatcher(model, max_batch=2) as batcher:
        futures = []
        for i, size in enumerate((64, 64, 72, 64)):
            req = _req(i, height=size, width=64, num_inference_steps=2, num_images_per_prompt=1)
            fut = batcher.submit_async(req)
            fut.add_done_callback(lambda _f, i=i: order.append(i))
            futures.append(fut)
        results = [f.result() for f in futures]
    assert [r.images[0].image.size for r in results] == [(64, 64), (64, 64), (64, 72), (64, 64)]
    # the 72-high request is not overtaken by the later 64 one
    assert order.index(2) < order.index(3)


def test_queue_bound_and_oversized_request(model) -> None:  # type: ignore[no-untyped-def]
    gate = threading.Event()
    with StepBatcher(model, max_batch=1, max_queue=1) as batcher:
        first = batcher.submit_async(_req(1, num_inference_steps=3), on_step=lambda s, t: gate.wait(10))
        # the first request is running (or about to); fill the queue, then one more is refused
        waiting = []
        with pytest.raises(QueueFullError):
            for i in range(3):
                waiting.append(batcher.submit_async(_req(2 + i, num_images_per_prompt=2)))
        gate.set()
        assert len(first.result().images) == 2
        for fut in waiting:
            assert len(fut.result().images) == 4  # larger than max_batch: runs alone
        assert batcher.stats.rejected == 1


def test_errors_reach_the_caller(model) -> None:  # type: ignore[no-untyped-def]
    with StepBatcher(model) as batcher:
        def boom(step: int, total: int) -> None:
            raise RuntimeError("callback exploded")

        with pytest.raises(Exception, match="callback exploded"):
            batcher.submit(_req(3), on_step=boom)
        assert len(batcher.submit(_req(4)).images) == 1  # the worker survives


def test_worker_handler_uses_the_batcher(sd1_dir: Path) -> None:
    """``--max-batch`` wiring: the default handler's one generation call goes through a StepBatcher."""
    import base64
    import io
    import json

    from PIL import Image

    from sdmaker.serving import HandlerService

    body = json.dumps({"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 2,
                       "seed": 9, "format": "png"}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    answers = []
    for max_batch in (0, 4):
        # fp32: in bf16 a batch of two rounds differently from one request (2 levels seen), whether or not the
        # two requests happen to share a batch; the exactness bar is fp32's
        handler = HandlerService(sd1_dir, max_batch=max_batch, dtype="fp32")
        handler.load()
        assert ("<lambda>" in handler.model.runner.__qualname__) == (max_batch > 0)
        responses: list[object] = [None, None]

        def call(i: int, h: HandlerService = handler, out: list[object] = responses) -> None:
            out[i] = h.handle(body, headers)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status == 200 for r in responses)  # type: ignore[attr-defined]
        answers.append([np.asarray(Image.open(io.BytesIO(base64.b64decode(json.loads(r.body)["generated_images"][0]))),
                                   dtype=np.int16) for r in responses])  # type: ignore[attr-defined]
    for solo, batched in zip(answers[0], answers[1], strict=True):
        assert np.abs(solo - batched).max() <= 1  # same seeds: same image batched or not


def test_batched_deepcache_equals_solo_deepcache(model) -> None:  # type: ignore[no-untyped-def]
    reqs = [_req(i, num_inference_steps=4 + i).resolve(model.defaults) for i in range(3)]
    solo = [generate_fast(model, r, deep_cache_interval=2) for r in reqs]
    with StepBatcher(model, max_batch=8, deep_cache_interval=2) as batcher:
        futures = [batcher.submit_async(r) for r in reqs]
        batched = [f.result() for f in futures]
        assert batcher.stats.unet_calls < sum(r.request.num_inference_steps for r in batched)
    for a, b in zip(solo, batched, strict=True):
        assert a.timings["unet_full_calls"] == b.timings["unet_full_calls"] < b.request.num_inference_steps
        assert float(np.abs(a.arrays - b.arrays).max()) <= 1e-4  # type: ignore[attr-defined]


def _two_in_one_batch(model, stop) -> tuple[object, object, list[int], object]:  # type: ignore[no-untyped-def]
    """A (6 steps) and B (5 steps) share a batch; ``stop(job_a)`` is called from A's callback after its step 2."""
    a_req = _req(1, num_inference_steps=6, scheduler="euler_a", seed=5)
    b_req = _req(2, num_inference_steps=5, scheduler="dpmpp_2m", seed=6)
    a_steps: list[int] = []
    holder: dict[str, object] = {}

    def on_a(step: int, total: int) -> None:
        a_steps.append(step)
        if step == 2:
            stop(holder["a"])

    with StepBatcher(model, max_batch=8) as batcher:
        with model.lock:  # neither starts before both are queued: they run side by side from their first steps
            holder["a"] = batcher.submit_async(a_req, on_step=on_a)
            b = batcher.submit_async(b_req)
        b_result = b.result()
        with pytest.raises(Exception) as info:
            holder["a"].result()  # type: ignore[attr-defined]
        stats = batcher.stats
    assert stats.max_rows == 2 * 2 + 2 * 1  # both CFG jobs were in one UNet call (A has 2 images, B one)
    return info.value, b_result, a_steps, stats


def test_cancelled_job_leaves_its_batch_and_the_others_carry_on(model) -> None:  # type: ignore[no-untyped-def]
    err, b_result, a_steps, stats = _two_in_one_batch(model, lambda job: job.cancel("client went away"))
    assert isinstance(err, GenerationCancelledError) and "client went away" in str(err)
    assert a_steps == [1, 2]  # it left at the step boundary right after the cancel
    assert stats.cancelled == 1 and stats.completed == 1
    solo = generate(model, _req(2, num_inference_steps=5, scheduler="dpmpp_2m", seed=6))
    assert float(np.abs(solo.arrays - b_result.arrays).max()) <= 1e-4  # type: ignore[attr-defined,operator]


def test_job_past_its_deadline_leaves_its_batch(model) -> None:  # type: ignore[no-untyped-def]
    def expire(job) -> None:  # type: ignore[no-untyped-def]
        job.deadline = time.monotonic() - 1.0  # as if its time ran out during step 2

    err, b_result, a_steps, stats = _two_in_one_batch(model, expire)
    assert isinstance(err, InvocationTimeoutError) and "deadline" in str(err)
    assert a_steps == [1, 2] and stats.timed_out == 1
    solo = generate(model, _req(2, num_inference_steps=5, scheduler="dpmpp_2m", seed=6))
    assert float(np.abs(solo.arrays - b_result.arrays).max()) <= 1e-4  # type: ignore[attr-defined,operator]


def test_queued_job_can_be_cancelled_or_expire_before_it_runs(model) -> None:  # type: ignore[no-untyped-def]
    gate = threading.Event()
    with StepBatcher(model, max_batch=1) as batcher:
        first = batcher.submit_async(_req(1, num_inference_steps=3), on_step=lambda s, t: gate.wait(10))
        waiting = batcher.submit_async(_req(2))  # 2 images > max_batch room left: waits in the queue
        expired = batcher.submit_async(_req(3), timeout_s=0.0)
        assert waiting.cancel() is True
        gate.set()
        with pytest.raises(GenerationCancelledError):
            waiting.result()
        with pytest.raises(InvocationTimeoutError):
            expired.result()
        assert len(first.result().images) == 2
        assert first.cancel() is False  # finished: nothing left to cancel
        assert not waiting.cancelled()  # the answer is an sdmaker error, not concurrent.futures' CancelledError
        assert (batcher.stats.cancelled, batcher.stats.timed_out, batcher.stats.completed) == (1, 1, 1)


def test_a_failing_callback_fails_its_own_job_only(model) -> None:  # type: ignore[no-untyped-def]
    def boom(step: int, total: int) -> None:
        if step == 2:
            raise RuntimeError("callback exploded")

    with StepBatcher(model, max_batch=8) as batcher:
        with model.lock:
            bad = batcher.submit_async(_req(1, num_inference_steps=4), on_step=boom)
            good = batcher.submit_async(_req(2, num_inference_steps=4))
        with pytest.raises(EngineError, match="callback exploded"):
            bad.result()
        assert len(good.result().images) == 1


def test_small_requests_progress_beside_a_huge_one(model) -> None:  # type: ignore[no-untyped-def]
    """Issue 11: a huge request (4x the pixels, many steps) does not make small ones of another size wait."""
    huge_req = _req(1, height=128, width=128, num_inference_steps=30, num_images_per_prompt=1, scheduler="ddim")
    smalls = [_req(10 + i, num_inference_steps=3, num_images_per_prompt=1) for i in range(3)]
    started, go = threading.Event(), threading.Event()
    huge_steps: list[int] = []

    def on_huge(step: int, total: int) -> None:
        huge_steps.append(step)
        if step == 1:
            started.set()
            go.wait(30)  # the small requests are queued while the huge one is running

    steps_at_small_done: list[int] = []
    with StepBatcher(model, max_batch=4) as batcher:
        huge = batcher.submit_async(huge_req, on_step=on_huge)
        assert started.wait(60)
        small_jobs = [batcher.submit_async(r) for r in smalls]
        for job in small_jobs:
            job.add_done_callback(lambda _f: steps_at_small_done.append(len(huge_steps)))
        go.set()
        small_results = [j.result(timeout=300) for j in small_jobs]
        huge_result = huge.result(timeout=300)
    assert len(steps_at_small_done) == 3
    # every small request was answered while the huge one still had most of its steps to run
    assert max(steps_at_small_done) < 30 // 2, steps_at_small_done
    assert huge_steps == list(range(1, 31))
    for req, got in zip(smalls, small_results, strict=True):
        solo = generate(model, req)
        assert float(np.abs(solo.arrays - got.arrays).max()) <= 1e-4  # type: ignore[attr-defined,operator]
    solo_huge = generate(model, huge_req)
    assert float(np.abs(solo_huge.arrays - huge_result.arrays).max()) <= 1e-4  # type: ignore[attr-defined,operator]


def test_cancel_all_stops_running_and_queued_jobs(model) -> None:  # type: ignore[no-untyped-def]
    """A stopping worker (SIGTERM) ends every generation at its next step boundary."""
    started, go = threading.Event(), threading.Event()

    def on_step(step: int, total: int) -> None:
        started.set()
        go.wait(30)

    with StepBatcher(model, max_batch=1) as batcher:
        running = batcher.submit_async(_req(1, num_inference_steps=50, num_images_per_prompt=1), on_step=on_step)
        queued = batcher.submit_async(_req(2, num_images_per_prompt=1))
        assert started.wait(60)
        assert batcher.cancel_all("the worker is stopping") == 2
        go.set()
        for job in (running, queued):
            with pytest.raises(GenerationCancelledError, match="stopping"):
                job.result(timeout=60)


def test_small_request_is_answered_while_a_heavy_step_runs(model) -> None:  # type: ignore[no-untyped-def]
    """A heavy group steps on the heavy lane: a small request does not wait for the huge one's current step.

    The huge request's step callback blocks (as a minutes-long 1024x1024 step would) until the small
    request has its answer; without the heavy lane the small one could never be admitted, and this would
    deadlock until the timeout below.
    """
    small_done = threading.Event()
    # 4 UNet rows of 256x256: above the work that counts as heavy before anything was measured
    big_req = _req(5, height=256, width=256, num_inference_steps=3, num_images_per_prompt=2)
    small_req = _req(6, num_inference_steps=3, num_images_per_prompt=1)

    def big_step(step: int, total: int) -> None:
        if step == 1:
            assert small_done.wait(600), "the small request was not answered while the heavy step ran"

    with StepBatcher(model, max_batch=4) as batcher:
        big = batcher.submit_async(big_req, on_step=big_step)
        while batcher.stats.heavy_steps == 0:  # the heavy lane has the big request's first step
            time.sleep(0.01)
        small = batcher.submit(small_req)
        small_done.set()
        big_result = big.result(timeout=900)
        assert batcher.stats.heavy_steps == 3 and batcher.stats.completed == 2
    assert float(np.abs(generate(model, big_req).arrays - big_result.arrays).max()) <= 1e-4  # type: ignore[operator]
    assert float(np.abs(generate(model, small_req).arrays - small.arrays).max()) <= 1e-4  # type: ignore[operator]


def test_without_the_heavy_lane_every_step_runs_on_the_batcher_thread(model) -> None:  # type: ignore[no-untyped-def]
    with StepBatcher(model, heavy_step_s=None) as batcher:
        batcher.submit(_req(5, height=256, width=256, num_inference_steps=2, num_images_per_prompt=1))
        assert batcher.stats.heavy_steps == 0
