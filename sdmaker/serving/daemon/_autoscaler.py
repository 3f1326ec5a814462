"""sdmaker's own target-tracking loop: what drives a variant's instance count on the local backend.

Every tick (a twelfth of the metric window, 0.25-1 s) it samples each scaled endpoint's counters, which the
daemon keeps for every request anyway (:class:`~._live.LiveEndpoint` ``invocations`` and ``pending``), and
computes the two SageMaker metrics from them:

* ``SageMakerVariantInvocationsPerInstance``: requests answered per minute over the metric window
  (``SDMAKER_AUTOSCALING_WINDOW``, 60 s by default, CloudWatch's period), per instance;
* ``SageMakerVariantConcurrentRequestsPerModelHighResolution``: requests in flight or queued, averaged over
  a sixth of the window (10 s by default, the high-resolution period), per instance.

Each policy asks for ``ceil(total / TargetValue)`` instances (:func:`~._scaling.desired_capacity`); the
largest ask wins, clamped to the target's bounds. Cooldowns as AWS applies them: a scale-out waits
``ScaleOutCooldown`` after the previous scale-out; a scale-in waits ``ScaleInCooldown`` after any scaling
activity, needs a full window of samples (a fresh daemon knows nothing about the load yet) and every
policy's agreement (none with ``DisableScaleIn``). A request that finds no instance (``MinCapacity`` 0) starts
one at once, whatever the cooldowns. Every change is a scaling activity, stored with its cause and outcome
(``DescribeScalingActivities``). One activity at a time per endpoint.

On a backend that scales natively (Ray Serve, :meth:`~._endpoints.EndpointManager.apply_scaling` returned
``True``) the loop leaves the endpoint alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from sdmaker.config import Settings
from sdmaker.errors import SdmakerError
from sdmaker.serving.daemon._live import LiveEndpoint
from sdmaker.serving.daemon._scaling import (
    CONCURRENCY_METRIC,
    INVOCATIONS_METRIC,
    ScalingTarget,
    desired_capacity,
    parse_resource_id,
    resource_id,
)
from sdmaker.serving.daemon._scaling_store import ScalingStore
from sdmaker.serving.daemon._state import EndpointStatus, StateDB

__all__ = ["Autoscaler", "ScaledEndpoints"]

logger = logging.getLogger(__name__)


class ScaledEndpoints(Protocol):
    """What the autoscaler needs of the endpoint manager (:class:`~._endpoints.EndpointManager`): the seam's
    three calls, plus the settings, the database and the live endpoints whose counters it samples."""

    settings: Settings
    db: StateDB
    live: dict[str, LiveEndpoint]

    async def set_instance_count(self, endpoint: str, variant: str, count: int) -> None: ...

    async def apply_scaling(self, endpoint: str, variant: str, target: ScalingTarget | None) -> bool: ...

    def instance_counts(self, endpoint: str) -> tuple[int, int]: ...


@dataclass
class _Tracked:
    """One scaled variant: its target, and what the loop remembers about it."""

    endpoint: str
    variant: str
    target: ScalingTarget
    #: whether the endpoint's backend scales it natively; ``None``: not asked yet (after a daemon restart)
    native: bool | None = None
    #: the pool the target was last handed to: a new pool (restart, UpdateEndpoint) gets it again
    applied_to: object | None = None
    #: (monotonic time, invocations answered so far, requests pending) samples within the window
    samples: collections.deque[tuple[float, int, int]] = field(default_factory=collections.deque)
    last_scale_out: float = float("-inf")
    last_scaling: float = float("-inf")


class Autoscaler:
    """The scaling targets of one daemon, their activities, and the target-tracking loop (local backend)."""

    def __init__(self, manager: ScaledEndpoints) -> None:
        self.manager = manager
        self.store = ScalingStore(manager.db)
        self.window_s = manager.settings.autoscaling_window_s
        self.tick_s = max(0.25, min(1.0, self.window_s / 12))
        self._tracked: dict[str, _Tracked] = {}
        self._activities: dict[str, asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()  # every activity task, for close()
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._loop: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.store.fail_unfinished()
        self.refresh()
        self._loop = asyncio.create_task(self._run(), name="autoscaler")

    async def close(self) -> None:
        """Stop the loop and any activity in progress (a growing pool stops the workers it was starting)."""
        tasks = [t for t in [self._loop, *self._running] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._activities.clear()

    async def forget(self, endpoint: str) -> None:
        """The endpoint is being deleted: end its activity; its stored count goes (targets stay, as on AWS)."""
        task = self._activities.pop(endpoint, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.store.forget_count(endpoint)
        tracked = self._tracked.get(endpoint)
        if tracked is not None:  # a later endpoint of this name starts afresh under the same target
            tracked.native = tracked.applied_to = None
            tracked.samples.clear()

    def refresh(self) -> None:
        """Re-read the targets and policies (after an API call changed them); keeps each one's history."""
        tracked: dict[str, _Tracked] = {}
        for rec in self.store.targets():
            parsed = parse_resource_id(rec.resource_id)
            target = self.store.scaling_target(rec.resource_id)
            if parsed is None or target is None:
                continue
            old = self._tracked.get(parsed[0])
            if old is not None and old.variant == parsed[1]:
                old.target = target
                tracked[parsed[0]] = old
            else:
                tracked[parsed[0]] = _Tracked(parsed[0], parsed[1], target)
        self._tracked = tracked

    def set_native(self, endpoint: str, native: bool) -> None:
        """The endpoint's current pool was just handed its target (``apply_scaling`` answered ``native``)."""
        tracked = self._tracked.get(endpoint)
        if tracked is not None:
            rt = self.manager.live.get(endpoint)
            tracked.native, tracked.applied_to = native, rt.pool if rt is not None else None

    # -- counts ------------------------------------------------------------------------------------------

    def initial_instances(self, endpoint: str, variant: str, initial: int) -> int:
        """Instances a (re)starting endpoint gets: its stored count (a restart keeps a scaled count), else
        ``initial`` (``InitialInstanceCount``), within its scalable target's bounds."""
        stored = self.store.count(endpoint)
        count = initial if stored is None else stored
        target = self.store.scaling_target(resource_id(endpoint, variant))
        if target is not None and target.clamp(count) != count:
            count = target.clamp(count)
            self.store.set_count(endpoint, variant, count)  # what DescribeEndpoint reports as desired
        return count

    def scale(self, endpoint: str, variant: str, count: int, *, cause: str) -> asyncio.Task[None]:
        """Start a scaling activity to ``count`` instances (recorded; after the endpoint's current one)."""
        task = asyncio.create_task(self._activity(endpoint, variant, count, cause), name=f"scale-{endpoint}")
        self._track_task(endpoint, task)
        return task

    def _track_task(self, endpoint: str, task: asyncio.Task[None]) -> None:
        """``task`` is the endpoint's current activity until it ends (``busy`` meanwhile; cancelled on close)."""
        self._activities[endpoint] = task
        self._running.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._running.discard(finished)
            if self._activities.get(endpoint) is finished:
                del self._activities[endpoint]

        task.add_done_callback(done)

    def busy(self, endpoint: str) -> bool:
        return endpoint in self._activities

    def wake(self, endpoint: str) -> None:
        """A request found no instance: start one now (the loop retries if an activity is running)."""
        tracked = self._tracked.get(endpoint)
        if tracked is None or tracked.native is not False or self.busy(endpoint):
            return
        count = max(1, tracked.target.min_capacity)
        self.scale(endpoint, tracked.variant, count, cause="a request arrived while the variant had no instance "
                   f"(MinCapacity {tracked.target.min_capacity}): starting one")

    async def _activity(self, endpoint: str, variant: str, count: int, cause: str) -> None:
        rid = resource_id(endpoint, variant)
        async with self._locks[endpoint]:
            activity = await asyncio.to_thread(self.store.start_activity, rid,
                                               f"Setting desired instance count to {count}.", cause)
            logger.info("endpoint %s: scaling to %d instance(s): %s", endpoint, count, cause)
            try:
                await self.manager.set_instance_count(endpoint, variant, count)
            except asyncio.CancelledError:
                self.store.end_activity(activity, "Failed", f"Failed to set desired instance count to {count}: "
                                        "the activity was cancelled (endpoint deleted or daemon stopped).")
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is the activity's outcome, never the loop's
                reason = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
                logger.warning("endpoint %s: scaling to %d failed: %s", endpoint, count, reason)
                self.store.end_activity(activity, "Failed", f"Failed to set desired instance count to {count}. "
                                        f"Reason: {reason}")
                return
            finally:
                now = time.monotonic()
                tracked = self._tracked.get(endpoint)
                if tracked is not None:
                    tracked.last_scaling = now
            self.store.end_activity(activity, "Successful", f"Successfully set desired instance count to {count}. "
                                    "Change successfully fulfilled by sagemaker.")

    # -- the loop ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self._tick(time.monotonic())
            except Exception:  # noqa: BLE001 - the loop must outlive any one endpoint's trouble
                logger.exception("autoscaler tick failed")

    def _tick(self, now: float) -> None:
        for tracked in list(self._tracked.values()):
            rt = self.manager.live.get(tracked.endpoint)
            if rt is None or rt.pool is None or rt.status is not EndpointStatus.IN_SERVICE:
                continue
            if tracked.native is None or tracked.applied_to is not rt.pool:  # a new pool: hand it the target
                if not self.busy(tracked.endpoint):
                    self._track_task(tracked.endpoint, asyncio.create_task(
                        self._apply(tracked), name=f"apply-scaling-{tracked.endpoint}"))
                continue
            if tracked.native:
                continue
            samples = tracked.samples
            samples.append((now, rt.invocations, rt.pending))
            while samples and samples[0][0] < now - self.window_s:
                samples.popleft()
            if self.busy(tracked.endpoint):
                continue
            current = self.manager.instance_counts(tracked.endpoint)[1]
            target = tracked.target
            if current == 0 and rt.pending > 0:
                self.wake(tracked.endpoint)
                continue
            if target.clamp(current) != current:
                bound = "minimum" if current < target.min_capacity else "maximum"
                value = target.min_capacity if current < target.min_capacity else target.max_capacity
                self.scale(tracked.endpoint, tracked.variant, value, cause=f"{bound} capacity was set to {value}")
                continue
            decision = self._decide(tracked, current, now)
            if decision is not None:
                count, cause = decision
                if count > current:
                    tracked.last_scale_out = now
                self.scale(tracked.endpoint, tracked.variant, count, cause=cause)

    async def _apply(self, tracked: _Tracked) -> None:
        rt = self.manager.live.get(tracked.endpoint)
        tracked.applied_to = rt.pool if rt is not None else None
        try:
            tracked.native = await self.manager.apply_scaling(tracked.endpoint, tracked.variant, tracked.target)
        except SdmakerError as exc:  # e.g. SDMAKER_MAX_INSTANCES lowered since: the loop still keeps the bounds
            logger.warning("endpoint %s: its scalable target no longer fits this backend: %s", tracked.endpoint,
                           exc.message)
            tracked.native = False

    def _metric_total(self, metric: str, samples: collections.deque[tuple[float, int, int]],
                      now: float) -> float | None:
        """The metric summed over all instances (``None``: not enough samples yet)."""
        if metric == INVOCATIONS_METRIC:
            first, last = samples[0], samples[-1]
            span = last[0] - first[0]
            if span < self.tick_s:
                return None
            return (last[1] - first[1]) / span * 60.0
        recent = [pending for t, _, pending in samples if t >= now - self.window_s / 6]
        return sum(recent) / len(recent) if recent else None

    def _decide(self, tracked: _Tracked, current: int, now: float) -> tuple[int, str] | None:
        """(instances, cause) when the policies ask for a change the cooldowns allow; ``None`` otherwise."""
        target = tracked.target
        asks: list[tuple[int, str, float, float]] = []  # (desired, policy, value per instance, target)
        for policy in target.policies:
            total = self._metric_total(policy.metric, tracked.samples, now)
            if total is None:
                return None
            asks.append((desired_capacity(total, policy.target_value), policy.name, total / max(1, current),
                         policy.target_value))
        if not asks:
            return None
        desired = target.clamp(max(a[0] for a in asks))
        window = {INVOCATIONS_METRIC: self.window_s, CONCURRENCY_METRIC: self.window_s / 6}
        if desired > current:
            if target.scale_out_suspended:
                return None
            wanting = [(a, p) for a, p in zip(asks, target.policies, strict=True) if a[0] > current]
            if all(now - tracked.last_scale_out < p.scale_out_cooldown_s for _, p in wanting):
                return None
            ask, policy = max(wanting, key=lambda ap: ap[0][0])
            return desired, (f"policy {policy.name}: {policy.metric} was {ask[2]:.3g} per instance over the last "
                             f"{window[policy.metric]:g} s, above its target of {policy.target_value:g}")
        if desired < current:
            if target.scale_in_suspended or any(p.disable_scale_in for p in target.policies):
                return None
            if tracked.samples[-1][0] - tracked.samples[0][0] < self.window_s * 0.9:
                return None  # scale in only on a full window of low load
            if now - tracked.last_scaling < max(p.scale_in_cooldown_s for p in target.policies):
                return None
            policy = target.policies[0]
            ask = asks[0]
            return desired, (f"policy {policy.name}: {policy.metric} was {ask[2]:.3g} per instance over the last "
                             f"{window[policy.metric]:g} s, below its target of {policy.target_value:g}")
        return None
