"""Autoscaling's one seam between the Application Auto Scaling API and the backends that run an endpoint's workers.

What a backend is told (:class:`ScalingTarget`): a variant's instance count bounds (``MinCapacity`` /
``MaxCapacity`` of ``RegisterScalableTarget``) and its ``TargetTrackingScaling`` policies
(:class:`TrackingPolicy`: the metric tracked, its target value, cooldowns, ``DisableScaleIn``). Two ways to apply it, chosen by the backend
(:meth:`~._endpoints.EndpointManager.apply_scaling`):

* natively: Ray Serve's own autoscaler (:meth:`ScalingTarget.ray_autoscaling_config` is the translation);
* driven by sdmaker's target-tracking loop (:mod:`._autoscaler`, the local backend), which reads the daemon's
  own metrics and calls :meth:`~._endpoints.EndpointManager.set_instance_count`.

Target tracking, as AWS describes it: the capacity that brings the metric back to its target is
``ceil(metric_total / target_value)``, clamped to ``[min, max]``, where the total is the per-instance metric
summed over the instances (:func:`desired_capacity`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CONCURRENCY_METRIC", "INVOCATIONS_METRIC", "METRICS", "SCALABLE_DIMENSION", "SERVICE_NAMESPACE",
           "ScalingMetric", "ScalingTarget", "TrackingPolicy", "desired_capacity", "parse_resource_id", "resource_id"]

SERVICE_NAMESPACE = "sagemaker"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
#: Invocations per minute per instance (CloudWatch's ``InvocationsPerInstance``, 1-minute sums).
INVOCATIONS_METRIC = "SageMakerVariantInvocationsPerInstance"
#: Requests in flight or queued per instance (``ConcurrentRequestsPerModel``, high resolution: 10 s).
CONCURRENCY_METRIC = "SageMakerVariantConcurrentRequestsPerModelHighResolution"
ScalingMetric = Literal["SageMakerVariantInvocationsPerInstance",
                        "SageMakerVariantConcurrentRequestsPerModelHighResolution"]
METRICS: tuple[str, ...] = (INVOCATIONS_METRIC, CONCURRENCY_METRIC)
#: AWS's default cooldowns for SageMaker target tracking when the policy gives none (seconds).
DEFAULT_SCALE_OUT_COOLDOWN_S = 300.0
DEFAULT_SCALE_IN_COOLDOWN_S = 300.0

_RESOURCE = re.compile(r"^endpoint/(?P<endpoint>[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62})/variant/"
                       r"(?P<variant>[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62})$")


def parse_resource_id(value: str) -> tuple[str, str] | None:
    """``endpoint/NAME/variant/VARIANT`` -> (endpoint, variant); ``None`` when it is not that shape."""
    match = _RESOURCE.match(value)
    return (match["endpoint"], match["variant"]) if match else None


def resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


@dataclass(frozen=True)
class TrackingPolicy:
    """One ``TargetTrackingScaling`` policy: keep ``metric`` (per instance) at ``target_value``."""

    name: str
    metric: ScalingMetric
    target_value: float
    scale_out_cooldown_s: float = DEFAULT_SCALE_OUT_COOLDOWN_S
    scale_in_cooldown_s: float = DEFAULT_SCALE_IN_COOLDOWN_S
    disable_scale_in: bool = False


@dataclass(frozen=True)
class ScalingTarget:
    """What one endpoint variant's instance count follows: ``RegisterScalableTarget``'s bounds and the
    target-tracking policies put on it.

    With no policy the count stays where it is, moved only into ``[min_capacity, max_capacity]``. With
    several, as on AWS, the variant scales out when any policy asks for more and in only when all agree.
    ``min_capacity`` may be 0: a request that arrives with no instance waits while one starts.
    """

    min_capacity: int
    max_capacity: int
    policies: tuple[TrackingPolicy, ...] = ()
    #: ``SuspendedState`` of the scalable target (``DynamicScalingOut/InSuspended``)
    scale_out_suspended: bool = False
    scale_in_suspended: bool = False

    def clamp(self, count: int) -> int:
        return max(self.min_capacity, min(self.max_capacity, count))

    def ray_autoscaling_config(self, seconds_per_request: float | None = None) -> dict[str, Any]:
        """This target as Ray Serve's ``autoscaling_config`` (``serve.deployment(autoscaling_config=...)``).

        Serve follows one target, ongoing requests per replica: the concurrency policy when there is one
        (it maps one to one), else the first policy. Invocations per minute per instance map through
        Little's law (ongoing = rate x time per request), so ``seconds_per_request`` (measured, e.g. the
        endpoint's p50) is needed for them; without one, a target of 1 ongoing request is used. Serve has no
        switch for ``DisableScaleIn`` or a suspended scale-in: the downscale delay becomes effectively
        infinite instead. Without a policy the replicas stay within the bounds at a fixed target of 1.
        """
        policy = next((p for p in self.policies if p.metric == CONCURRENCY_METRIC),
                      self.policies[0] if self.policies else None)
        if policy is None:
            ongoing, out_s, in_s, no_in = 1.0, DEFAULT_SCALE_OUT_COOLDOWN_S, DEFAULT_SCALE_IN_COOLDOWN_S, True
        else:
            ongoing = policy.target_value
            if policy.metric == INVOCATIONS_METRIC:
                ongoing = policy.target_value / 60.0 * seconds_per_request if seconds_per_request else 1.0
            out_s, in_s, no_in = policy.scale_out_cooldown_s, policy.scale_in_cooldown_s, policy.disable_scale_in
        return {
            "min_replicas": self.min_capacity,
            "max_replicas": self.max_capacity,
            "target_ongoing_requests": max(ongoing, 1e-3),
            "upscale_delay_s": 10.0**9 if self.scale_out_suspended else out_s,
            "downscale_delay_s": 10.0**9 if no_in or self.scale_in_suspended else in_s,
        }


def desired_capacity(metric_total: float, target_value: float) -> int:
    """Target tracking: the instance count at which a per-instance metric whose sum over all instances is
    ``metric_total`` would be at ``target_value``. Unclamped; at least 1 while there is any load, 0 with none."""
    total = metric_total
    if total <= 0:
        return 0
    return max(1, math.ceil(total / target_value - 1e-9))
