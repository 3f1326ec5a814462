"""The daemon's SQLite state: endpoint statistics saved and read back (a restart keeps them)."""

from __future__ import annotations

from pathlib import Path

from sdmaker.serving.daemon._state import EndpointStats, StateDB


def test_endpoint_stats_round_trip_replace_and_delete(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.sqlite3")
    assert db.stats("ep") is None
    db.save_stats("ep", EndpointStats(3, 1, [0.5, 0.25, 1.0]))
    db.save_stats("ep", EndpointStats(4, 1, [0.5, 0.25, 1.0, 0.125]))  # the newer save replaces the older
    db.close()
    reopened = StateDB(tmp_path / "state.sqlite3")  # what a restarted daemon reads
    assert reopened.stats("ep") == EndpointStats(4, 1, [0.5, 0.25, 1.0, 0.125])
    assert reopened.delete("endpoint_stats", "ep") and reopened.stats("ep") is None
    reopened.close()
