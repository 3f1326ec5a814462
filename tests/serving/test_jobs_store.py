"""The asynchronous job table on its own (no daemon): order, positions, state changes, TTL, restart."""

from __future__ import annotations

import time
from pathlib import Path

from sdmaker.serving.daemon._jobs import JobState, JobStore, JobSubmission, result_locations


def _sub(endpoint: str = "ep", ttl_s: int = 21600) -> JobSubmission:
    return JobSubmission(endpoint=endpoint, input_location=None, body=b"{}", content_type="application/json",
                         accept=None, custom_attributes=None, ttl_s=ttl_s, timeout_s=900,
                         output_location="s3://b/out/x.out", failure_location="s3://b/out/x-error.out")


def test_queue_order_positions_and_first_outcome_wins(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    for name in ("a", "b", "c"):
        assert store.insert(name, _sub())
    assert not store.insert("a", _sub())  # an id names one job
    store.insert("other", _sub("ep2"))
    jobs = {name: store.get(name) for name in ("a", "b", "c")}
    assert [store.position(j) for j in jobs.values() if j] == [0, 1, 2]
    assert [j.id for j in store.oldest_queued("ep", 10)] == ["a", "b", "c"]
    assert store.start("a") and not store.start("a")
    assert store.get("a").state is JobState.RUNNING and store.get("a").attempts == 1  # type: ignore[union-attr]
    assert store.position(jobs["b"]) == 0  # type: ignore[arg-type]
    assert store.backlog()["ep"][0] == 3 and store.backlog()["ep2"][0] == 1
    assert store.finish("a", JobState.SUCCEEDED)
    assert not store.finish("a", JobState.FAILED, "late")  # the first outcome wins
    assert store.get("a").state is JobState.SUCCEEDED  # type: ignore[union-attr]
    assert store.start("b") and store.requeue("b", count_attempt=False)
    assert store.get("b").attempts == 0 and store.get("b").state is JobState.QUEUED  # type: ignore[union-attr]
    store.start("c")
    store.close()

    again = JobStore(tmp_path / "jobs.sqlite3")  # a restart: what ran is queued again, attempts kept
    assert again.requeue_running() == 1
    c = again.get("c")
    assert c is not None and c.state is JobState.QUEUED and c.attempts == 1
    assert [j.id for j in again.listing(endpoint="ep", state="queued")] == ["c", "b"]  # newest first
    again.close()


def test_ttl_expiry_selects_only_old_queued_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.insert("short", _sub(ttl_s=60))
    store.insert("long", _sub(ttl_s=21600))
    now = time.time()
    assert store.expired(now) == []
    assert [j.id for j in store.expired(now + 61)] == ["short"]
    store.start("short")
    assert store.expired(now + 61) == []  # a running job is past its queue time
    store.close()


def test_result_locations_follow_sagemaker_names() -> None:
    config = {"OutputConfig": {"S3OutputPath": "s3://b/out/", "S3FailurePath": "s3://b/fail"}}
    assert result_locations(config, "abc") == ("s3://b/out/abc.out", "s3://b/fail/abc-error.out")
    assert result_locations(config, "abc", extension="x/y", filename="r.json") == (
        "s3://b/out/x/y/r.json", "s3://b/fail/x/y/r-error.out")
    out, _ = result_locations({"OutputConfig": {"S3OutputPath": "s3://b/o"}}, "has space/slash")
    assert out.startswith("s3://b/o/") and " " not in out and out.count("/") == 4
