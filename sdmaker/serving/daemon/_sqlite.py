"""One SQLite file of the daemon's durable state: one connection, WAL, every call a short transaction under a lock.

The endpoint state (:mod:`._state`), the asynchronous job queue (:mod:`._jobs`) and batch transform
(:mod:`._transform_state`) each keep their own file through this class, so a slow table never blocks another.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

__all__ = ["SqliteFile"]


class SqliteFile:
    """``path`` opened once with ``schema`` applied; ``_run`` returns rows, ``_change`` the rows changed.

    Args:
        synchronous_normal: ``PRAGMA synchronous=NORMAL`` (WAL commits still survive a process kill).
        timeout: seconds to wait for another connection's lock.
    """

    def __init__(self, path: Path, schema: str, *, synchronous_normal: bool = False, timeout: float = 5.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=timeout)
        self._db.execute("PRAGMA journal_mode=WAL")
        if synchronous_normal:
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _change(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount
