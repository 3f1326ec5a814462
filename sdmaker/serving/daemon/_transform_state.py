"""Durable state of batch transform jobs: the job, its input files and every finished unit, in SQLite.

Why a table per level: a daemon killed at any point (kill -9 included) must resume a job without
recomputing what it finished. The job row keeps the CreateTransformJob body verbatim (Describe answers
with it) and the status; a file row says whether its ``.out`` object was written; a unit row (one record,
or one mini-batch of records) says its output is safe in the spool folder (written with temp file +
``os.replace`` before the row is inserted, so a row always has its complete spool file).

The tables live in their own file next to the endpoints' state (``transform.sqlite3``): the job runner
writes a row per finished unit, and keeping those writes off the endpoints' database keeps the two apart.
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

__all__ = ["FileRecord", "FileStatus", "JobRecord", "TransformDB", "TransformStatus"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transform_jobs (
    name TEXT PRIMARY KEY, body TEXT NOT NULL, status TEXT NOT NULL, failure_reason TEXT,
    created REAL NOT NULL, modified REAL NOT NULL, started REAL, ended REAL);
CREATE TABLE IF NOT EXISTS transform_files (
    job TEXT NOT NULL, idx INTEGER NOT NULL, key TEXT NOT NULL, out_key TEXT NOT NULL, status TEXT NOT NULL,
    units INTEGER, error TEXT, PRIMARY KEY (job, idx));
CREATE TABLE IF NOT EXISTS transform_units (
    job TEXT NOT NULL, file_idx INTEGER NOT NULL, unit INTEGER NOT NULL, records INTEGER NOT NULL,
    PRIMARY KEY (job, file_idx, unit));
"""


class TransformStatus(str, enum.Enum):
    """SageMaker's ``TransformJobStatus`` (the wire strings, stored as such)."""

    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"

    def __str__(self) -> str:
        return str(self.value)

    @property
    def terminal(self) -> bool:
        return self in (TransformStatus.COMPLETED, TransformStatus.FAILED, TransformStatus.STOPPED)


class FileStatus(str, enum.Enum):
    """One input file: ``Pending`` until its ``.out`` object is written (``Done``) or a record failed it."""

    PENDING = "Pending"
    DONE = "Done"
    FAILED = "Failed"


@dataclass(frozen=True)
class JobRecord:
    name: str
    body: dict[str, Any]
    status: TransformStatus
    failure_reason: str | None
    created: float
    modified: float
    started: float | None
    ended: float | None


@dataclass(frozen=True)
class FileRecord:
    idx: int
    key: str
    out_key: str
    status: FileStatus
    units: int | None
    error: str | None


class TransformDB(SqliteFile):
    """Thread-safe access to ``transform.sqlite3`` (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, timeout=30)

    # -- jobs ------------------------------------------------------------------------------------------

    def add_job(self, name: str, body: dict[str, Any]) -> bool:
        """Insert a new ``InProgress`` job; False when the name is taken."""
        now = time.time()
        try:
            self._run("INSERT INTO transform_jobs (name, body, status, created, modified) VALUES (?, ?, ?, ?, ?)",
                      (name, json.dumps(body), TransformStatus.IN_PROGRESS.value, now, now))
        except sqlite3.IntegrityError:
            return False
        return True

    def set_job(self, name: str, **fields: Any) -> None:
        allowed = {"status", "failure_reason", "started", "ended"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [v.value if isinstance(v, TransformStatus) else v for v in fields.values()]
        self._run(f"UPDATE transform_jobs SET {sets}, modified = ? WHERE name = ?",  # noqa: S608 - keys checked
                  (*values, time.time(), name))

    def job(self, name: str) -> JobRecord | None:
        rows = self._run("SELECT name, body, status, failure_reason, created, modified, started, ended "
                         "FROM transform_jobs WHERE name = ?", (name,))
        return _job(rows[0]) if rows else None

    def jobs(self) -> list[JobRecord]:
        rows = self._run("SELECT name, body, status, failure_reason, created, modified, started, ended "
                         "FROM transform_jobs ORDER BY created")
        return [_job(r) for r in rows]

    # -- files -----------------------------------------------------------------------------------------

    def set_files(self, job: str, files: list[tuple[str, str]]) -> None:
        """Record the job's input files ``(key, output key)`` once, in one transaction (a rerun keeps them)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                if not self._db.execute("SELECT 1 FROM transform_files WHERE job = ? LIMIT 1", (job,)).fetchall():
                    self._db.executemany(
                        "INSERT INTO transform_files (job, idx, key, out_key, status) VALUES (?, ?, ?, ?, ?)",
                        [(job, i, key, out, FileStatus.PENDING.value) for i, (key, out) in enumerate(files)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def files(self, job: str) -> list[FileRecord]:
        rows = self._run("SELECT idx, key, out_key, status, units, error FROM transform_files WHERE job = ? "
                         "ORDER BY idx", (job,))
        return [FileRecord(r[0], r[1], r[2], FileStatus(r[3]), r[4], r[5]) for r in rows]

    def has_files(self, job: str) -> bool:
        return bool(self._run("SELECT 1 FROM transform_files WHERE job = ? LIMIT 1", (job,)))

    def set_file(self, job: str, idx: int, *, status: FileStatus | None = None, units: int | None = None,
                 error: str | None = None) -> None:
        if units is not None:
            self._run("UPDATE transform_files SET units = ? WHERE job = ? AND idx = ?", (units, job, idx))
        if status is not None:
            self._run("UPDATE transform_files SET status = ?, error = ? WHERE job = ? AND idx = ?",
                      (status.value, error, job, idx))

    # -- units -----------------------------------------------------------------------------------------

    def unit_done(self, job: str, file_idx: int, unit: int, records: int) -> None:
        """A unit's output is in the spool: record it (idempotent)."""
        self._run("INSERT OR REPLACE INTO transform_units (job, file_idx, unit, records) VALUES (?, ?, ?, ?)",
                  (job, file_idx, unit, records))

    def done_units(self, job: str, file_idx: int) -> set[int]:
        rows = self._run("SELECT unit FROM transform_units WHERE job = ? AND file_idx = ?", (job, file_idx))
        return {int(r[0]) for r in rows}

    def records_done(self, job: str) -> int:
        rows = self._run("SELECT COALESCE(SUM(records), 0) FROM transform_units WHERE job = ?", (job,))
        return int(rows[0][0])


def _job(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(row[0], json.loads(row[1]), TransformStatus(row[2]), *row[3:])
