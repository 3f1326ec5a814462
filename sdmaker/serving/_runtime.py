"""One endpoint's live side in the daemon: its worker pool, in-flight count and request statistics."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from sdmaker.serving._pool import WorkerPool
from sdmaker.serving._state import EndpointStats

__all__ = ["EndpointRuntime"]


@dataclass
class EndpointRuntime:
    """In-memory side of one endpoint: its worker pool and live statistics (saved to the daemon's state
    every few seconds, restored by a daemon restart)."""

    name: str
    timeout_s: float
    max_queue: int
    pool: WorkerPool | None = None
    task: asyncio.Task[None] | None = None
    default_handler: bool = False
    instance_type: str | None = None
    model_name: str | None = None
    pending: int = 0
    invocations: int = 0
    errors: int = 0
    latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2048))
    #: ``invocations`` when the stats were last saved (-1: never): only changed stats are written
    saved_invocations: int = -1

    def stats(self) -> EndpointStats:
        return EndpointStats(self.invocations, self.errors, list(self.latencies))

    def restore_stats(self, stats: EndpointStats) -> None:
        self.invocations, self.errors = stats.invocations, stats.errors
        self.latencies.extend(stats.latencies)
        self.saved_invocations = stats.invocations

    @property
    def workers(self) -> int:
        return len(self.pool.workers) if self.pool else 0

    @property
    def capacity(self) -> int:
        """Requests the workers take at once (workers x batch slots)."""
        return self.pool.capacity if self.pool else 0

    @property
    def queue_depth(self) -> int:
        return max(0, self.pending - self.capacity)

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
