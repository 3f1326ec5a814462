"""Size-capped endpoint logs, rotated the way logrotate's ``copytruncate`` does.

Why copytruncate and not rename: the writers are worker processes whose stdout/stderr *are* the log file
(a user's ``print`` in ``inference.py`` lands there), so the daemon cannot make them reopen it. Every writer
opens the file with ``O_APPEND`` (``open(..., "ab")`` for fresh workers, ``os.open(O_APPEND)`` for standbys),
so after the daemon copies the file to ``.1`` and truncates it, their next write goes to the new end (offset
0) instead of leaving a hole. Lines written between the copy and the truncate can be lost, as with
logrotate; the cap exists so that a daemon running for weeks does not fill the disk.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from sdmaker.files import atomic_open

__all__ = ["BACKUPS", "rotate_if_large"]

logger = logging.getLogger(__name__)

#: Rotated copies kept next to the log: ``endpoint.log.1`` (newest) .. ``endpoint.log.<BACKUPS>``.
BACKUPS = 2


def rotate_if_large(path: Path, max_bytes: int, backups: int = BACKUPS) -> bool:
    """Rotate ``path`` when it is larger than ``max_bytes`` (0 = never); return whether it rotated.

    The copy is written to a temporary file and renamed, so ``.1`` is never half-written; older copies
    shift up and the oldest is dropped. Errors (disk full, permissions) are logged, never raised: a log
    that cannot be rotated must not take an endpoint down.
    """
    if max_bytes <= 0:
        return False
    try:
        if path.stat().st_size <= max_bytes:
            return False
        for i in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        with atomic_open(path.with_name(f"{path.name}.1"), "wb") as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out)
        os.truncate(path, 0)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not rotate %s: %s", path, exc)
        return False
