"""The per-job event log: ordered ids, replay after Last-Event-ID, terminal events end subscriptions."""

from __future__ import annotations

import asyncio
import threading

from sdmaker.serving.daemon._events import EventHub


def test_replay_after_last_event_id_includes_the_final_event() -> None:
    hub = EventHub()
    hub.publish("j", "queued", {"position": 0})
    hub.publish("j", "step", {"step": 1, "total": 2})
    hub.publish("j", "done", {"status": 200})
    assert hub.publish("j", "step", {"step": 2, "total": 2}) is None  # nothing after a terminal event
    assert [e.id for e in hub.history("j")] == [1, 2, 3]
    assert [e.type for e in hub.history("j", after=2)] == ["done"]
    assert hub.latest("j", "step").data == {"step": 1, "total": 2}  # type: ignore[union-attr]
    assert hub.finished("j")
    assert hub.history("unknown") == []


def test_subscriber_receives_events_published_from_another_thread() -> None:
    hub = EventHub()

    async def consume() -> list[str]:
        got = []
        async for e in hub.subscribe("j", idle_timeout_s=5):
            got.append(e.type)
        return got

    async def main() -> list[str]:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)

        def produce() -> None:
            for i in range(3):
                hub.publish("j", "step", {"step": i + 1, "total": 3})
            hub.publish("j", "error", {"status": 424, "code": "ModelError", "message": "x"})

        threading.Thread(target=produce).start()
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(main()) == ["step", "step", "step", "error"]


def test_finished_jobs_are_pruned_beyond_the_bound() -> None:
    hub = EventHub(max_jobs=3)
    for i in range(5):
        hub.publish(f"j{i}", "done", {})
    assert "j0" not in hub and "j4" in hub
    first = hub.history("j4")[0]
    assert first.sse().startswith("id: 1\nevent: done\ndata: {}")
