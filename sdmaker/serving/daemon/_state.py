"""The daemon's durable state: models, endpoint configs and endpoints, in SQLite under ``SDMAKER_HOME``.

SQLite gives atomic, crash-safe writes for free (each call is one transaction), so a daemon killed at
any point restarts with a consistent view and brings its endpoints back. Records keep the
SageMaker request bodies verbatim (``CreateModel``/``CreateEndpointConfig``), so ``Describe*`` answers
with what the caller sent.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmaker.serving.daemon._sqlite import SqliteFile

__all__ = ["EndpointRecord", "EndpointStats", "EndpointStatus", "Record", "StateDB"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS endpoint_configs (
    name TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY, config_name TEXT NOT NULL, status TEXT NOT NULL, failure_reason TEXT,
    created REAL NOT NULL, modified REAL NOT NULL, model_digest TEXT, model_path TEXT);
CREATE TABLE IF NOT EXISTS endpoint_stats (
    name TEXT PRIMARY KEY, invocations INTEGER NOT NULL, errors INTEGER NOT NULL, latencies TEXT NOT NULL,
    saved REAL NOT NULL);
"""


class EndpointStatus(str, enum.Enum):
    """SageMaker's ``EndpointStatus`` values sdmaker uses (the wire strings, stored as such).

    Changed only by :class:`~._endpoints.EndpointManager`, which keeps the stored and the in-memory copy
    in step.
    """

    CREATING = "Creating"
    IN_SERVICE = "InService"
    UPDATING = "Updating"
    FAILED = "Failed"

    def __str__(self) -> str:  # f-strings and messages show the wire string on every Python version
        return str(self.value)

    @property
    def serving(self) -> bool:
        """Whether an endpoint in this state takes invocations (an update serves from the old workers)."""
        return self in (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING)


@dataclass(frozen=True)
class Record:
    """A stored model or endpoint config: its name, the request body it was created with, and when."""

    name: str
    body: dict[str, Any]
    created: float


@dataclass(frozen=True)
class EndpointRecord:
    name: str
    config_name: str
    status: EndpointStatus
    failure_reason: str | None
    created: float
    modified: float
    model_digest: str | None
    model_path: str | None


@dataclass(frozen=True)
class EndpointStats:
    """An endpoint's request counters and its recent latencies (seconds), as last saved."""

    invocations: int
    errors: int
    latencies: list[float]


class StateDB(SqliteFile):
    """Thread-safe access to ``<home>/endpoints/state.sqlite3`` (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    def add_schema(self, sql: str) -> None:
        """Create another concept's tables (``CREATE TABLE IF NOT EXISTS ...``) in this database."""
        with self._lock:
            self._db.executescript(sql)

    def run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction, for the modules that keep their own tables here."""
        return self._run(sql, args)

    # -- models and endpoint configs (same shape) ------------------------------------------------

    def put(self, table: str, name: str, body: dict[str, Any]) -> bool:
        """Insert a record; False when the name is taken (the caller answers "already existing")."""
        assert table in ("models", "endpoint_configs")
        try:
            self._run(f"INSERT INTO {table} (name, body, created) VALUES (?, ?, ?)",  # noqa: S608 - fixed names
                      (name, json.dumps(body), time.time()))
        except sqlite3.IntegrityError:
            return False
        return True

    def get(self, table: str, name: str) -> Record | None:
        assert table in ("models", "endpoint_configs")
        rows = self._run(f"SELECT name, body, created FROM {table} WHERE name = ?", (name,))  # noqa: S608
        return Record(rows[0][0], json.loads(rows[0][1]), rows[0][2]) if rows else None

    def delete(self, table: str, name: str) -> bool:
        assert table in ("models", "endpoint_configs", "endpoints", "endpoint_stats")
        with self._lock:
            cur = self._db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))  # noqa: S608
            return cur.rowcount > 0

    # -- endpoints ---------------------------------------------------------------------------------

    def add_endpoint(self, name: str, config_name: str, status: EndpointStatus) -> bool:
        now = time.time()
        try:
            self._run("INSERT INTO endpoints (name, config_name, status, created, modified) VALUES (?, ?, ?, ?, ?)",
                      (name, config_name, status.value, now, now))
        except sqlite3.IntegrityError:
            return False
        return True

    def set_endpoint(self, name: str, **fields: Any) -> None:
        allowed = {"config_name", "status", "failure_reason", "model_digest", "model_path"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [v.value if isinstance(v, EndpointStatus) else v for v in fields.values()]
        self._run(f"UPDATE endpoints SET {sets}, modified = ? WHERE name = ?",  # noqa: S608 - keys checked
                  (*values, time.time(), name))

    def endpoint(self, name: str) -> EndpointRecord | None:
        rows = self._run("SELECT name, config_name, status, failure_reason, created, modified, model_digest, "
                         "model_path FROM endpoints WHERE name = ?", (name,))
        return _endpoint_record(rows[0]) if rows else None

    def endpoints(self) -> list[EndpointRecord]:
        rows = self._run("SELECT name, config_name, status, failure_reason, created, modified, model_digest, "
                         "model_path FROM endpoints ORDER BY created")
        return [_endpoint_record(r) for r in rows]

    # -- endpoint statistics (written as each request finishes and at shutdown, so a restart keeps them) -

    def save_stats(self, name: str, stats: EndpointStats) -> None:
        self._run("INSERT OR REPLACE INTO endpoint_stats (name, invocations, errors, latencies, saved) "
                  "VALUES (?, ?, ?, ?, ?)",
                  (name, stats.invocations, stats.errors, json.dumps([round(x, 6) for x in stats.latencies]),
                   time.time()))

    def stats(self, name: str) -> EndpointStats | None:
        rows = self._run("SELECT invocations, errors, latencies FROM endpoint_stats WHERE name = ?", (name,))
        if not rows:
            return None
        return EndpointStats(int(rows[0][0]), int(rows[0][1]), [float(x) for x in json.loads(rows[0][2])])


def _endpoint_record(row: tuple[Any, ...]) -> EndpointRecord:
    return EndpointRecord(row[0], row[1], EndpointStatus(row[2]), *row[3:])
