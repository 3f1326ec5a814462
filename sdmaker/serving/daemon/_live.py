"""One endpoint's live side in the daemon: its status, worker pool, in-flight count and request statistics.

The daemon's in-memory view of an endpoint, so that an invocation reads no SQLite: the endpoint manager
changes ``status`` together with the stored record (:meth:`~._endpoints.EndpointManager` ``_set_status``).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from sdmaker.serving.daemon._admission import Admission
from sdmaker.serving.daemon._state import EndpointStats, EndpointStatus
from sdmaker.serving.daemon._variant import VariantPlan
from sdmaker.serving.daemon.ray._pool import Pool

__all__ = ["LiveEndpoint"]


@dataclass
class LiveEndpoint:
    """In-memory side of one endpoint: its worker pool and live statistics (written to the daemon's state
    as each request finishes, restored by a daemon restart)."""

    name: str
    timeout_s: float
    max_queue: int
    status: EndpointStatus = EndpointStatus.CREATING
    pool: Pool | None = None
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
    #: the work taken and not finished, and the measured throughput (issue 11's backpressure)
    admission: Admission = field(default_factory=Admission)
    #: the plan the current pool was started from (its workers' configuration; autoscaling resizes it)
    plan: VariantPlan | None = None

    def install(self, pool: Pool, plan: VariantPlan | None) -> Pool | None:
        """Serve from ``pool`` (started from ``plan``) from now on; returns the pool it replaces, to drain.

        Limits the model's Environment does not set keep their current values (the daemon's defaults).
        ``plan`` is ``None`` for a multi-model endpoint: each target model has its own (._multi_model), and
        bodies go to the target's handler unchecked (which handler that is, only the target model says).
        """
        old, self.pool = self.pool, pool
        self.plan = plan
        if plan is None:
            self.default_handler = False
            self.instance_type = getattr(pool, "instance_type", None)
            self.model_name = getattr(pool, "model_name", None)
            timeout_s, max_queue = getattr(pool, "timeout_s", None), getattr(pool, "max_queue", None)
            if timeout_s is not None:
                self.timeout_s = timeout_s
            if max_queue is not None:
                self.max_queue = max_queue
            return old
        pool.budget_pixels = plan.memory_budget_pixels
        self.default_handler, self.instance_type, self.model_name = (plan.default_handler, plan.instance_type,
                                                                     plan.model_name)
        if plan.timeout_s is not None:
            self.timeout_s = plan.timeout_s
        if plan.max_queue is not None:
            self.max_queue = plan.max_queue
        return old

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
        """Requests waiting for a worker (a free slot, or memory room on one)."""
        return self.pool.waiting if self.pool else 0

    @property
    def budget_pixels(self) -> int | None:
        return self.pool.budget_pixels if self.pool else None

    @property
    def ready_workers(self) -> int:
        return self.pool.ready_count if self.pool else 0

    @property
    def expected_wait_s(self) -> float:
        """Seconds a request arriving now would wait for the work ahead of it (measured rate, else the prior)."""
        if self.pool is None or (self.pool.free_slots > 0 and self.queue_depth == 0):
            return 0.0
        return self.admission.expected_wait_s(self.ready_workers)

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
