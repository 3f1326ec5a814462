"""The Application Auto Scaling subset for SageMaker endpoint variants (JSON 1.1, ``POST /`` with
``X-Amz-Target: AnyScaleFrontendService.<Operation>``), as ``boto3.client("application-autoscaling")`` sends it.

Operations: RegisterScalableTarget, DeregisterScalableTarget, DescribeScalableTargets, PutScalingPolicy
(``TargetTrackingScaling`` on ``SageMakerVariantInvocationsPerInstance`` or
``SageMakerVariantConcurrentRequestsPerModelHighResolution``), DescribeScalingPolicies, DeleteScalingPolicy,
DescribeScalingActivities. Only ``ServiceNamespace`` ``sagemaker``, ``ResourceId``
``endpoint/NAME/variant/VARIANT`` and ``ScalableDimension`` ``sagemaker:variant:DesiredInstanceCount``.

Input is checked first against botocore's own ``application-autoscaling`` model (:mod:`._shapes`), then here
for what the model cannot say (supported namespace, policy type and metrics, capacities, cooldowns); every
refusal is a ``ValidationException`` naming the member (AWS's lower-camel path). A target or policy that
does not exist is ``ObjectNotFoundException`` with AWS's wording. What the backend does with a target is
:meth:`~._endpoints.EndpointManager.apply_scaling`'s business (the local loop, or Ray Serve).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from sdmaker.config import Settings
from sdmaker.errors import ControlPlaneError, EndpointNotFoundError, SdmakerError, excerpt
from sdmaker.serving.daemon._control_plane import control_plane_error
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._scaling import (
    METRICS,
    SCALABLE_DIMENSION,
    SERVICE_NAMESPACE,
    ScalingTarget,
    parse_resource_id,
)
from sdmaker.serving.daemon._scaling_store import ActivityRecord, PolicyRecord, TargetRecord
from sdmaker.serving.daemon._shapes import check_input

__all__ = ["OPERATIONS", "SERVICE", "TARGET_PREFIX", "autoscaling_api"]

logger = logging.getLogger(__name__)

#: botocore's ``targetPrefix`` and service name for Application Auto Scaling
TARGET_PREFIX = "AnyScaleFrontendService."
SERVICE = "application-autoscaling"
_JSON11 = "application/x-amz-json-1.1"
#: AWS's page size bound for the Describe* operations
_MAX_PAGE = 50
#: cooldowns beyond a day are refused (AWS takes any integer; a larger one is a mistake here)
_MAX_COOLDOWN_S = 86_400


def _invalid(member: str, message: str) -> ControlPlaneError:
    """A ``ValidationException`` whose message names ``member`` (AWS's lower-camel path) the way :mod:`._shapes`
    does: in AWS's own sentence, or after it as ``(at 'member')``."""
    return ControlPlaneError(message if f"'{member}'" in message else f"{message} (at '{member}')", field=member)


class _Ctx:
    def __init__(self, body: dict[str, Any], settings: Settings, manager: EndpointManager) -> None:
        self.body, self.settings, self.manager = body, settings, manager
        self.store = manager.scaling.store

    def target_arn(self) -> str:
        return (f"arn:aws:application-autoscaling:{self.settings.region}:{self.settings.account_id}:"
                f"scalable-target/056{uuid.uuid4().hex[:25]}")

    def policy_arn(self, rid: str, name: str) -> str:
        return (f"arn:aws:autoscaling:{self.settings.region}:{self.settings.account_id}:scalingPolicy:"
                f"{uuid.uuid4()}:resource/{SERVICE_NAMESPACE}/{rid}:policyName/{name}")

    def default_role(self) -> str:
        return (f"arn:aws:iam::{self.settings.account_id}:role/aws-service-role/sagemaker.application-autoscaling"
                ".amazonaws.com/AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint")

    def resource(self, *, required: bool = True) -> tuple[str, str, str] | None:
        """(resource id, endpoint, variant) of the request, after checking namespace and dimension."""
        self.namespace()
        dimension = self.body.get("ScalableDimension")
        if dimension is not None and dimension != SCALABLE_DIMENSION:
            raise _invalid("scalableDimension", f"Unsupported scalable dimension {dimension!r}: sdmaker scales "
                           f"SageMaker endpoint variants, whose dimension is {SCALABLE_DIMENSION}")
        rid = self.body.get("ResourceId")
        if rid is None and not required:
            return None
        parsed = parse_resource_id(str(rid))
        if parsed is None:
            raise _invalid("resourceId", f"Unsupported resource ID {excerpt(rid, 80)}: a SageMaker endpoint variant "
                           "is endpoint/ENDPOINT_NAME/variant/VARIANT_NAME")
        return str(rid), parsed[0], parsed[1]

    def namespace(self) -> bool:
        """Whether the request is about SageMaker (the only namespace sdmaker has resources in)."""
        namespace = self.body["ServiceNamespace"]
        if namespace != SERVICE_NAMESPACE:
            raise _invalid("serviceNamespace", f"Unsupported service namespace {namespace!r}: sdmaker scales "
                           f"SageMaker endpoint variants only (ServiceNamespace {SERVICE_NAMESPACE!r})")
        return True

    def not_registered(self, rid: str) -> ControlPlaneError:
        return ControlPlaneError(f"No scalable target registered for service namespace: {SERVICE_NAMESPACE}, resource "
                                 f"ID: {rid}, scalable dimension: {SCALABLE_DIMENSION}", "ObjectNotFoundException",
                                 kind=EndpointNotFoundError)

    def page(self, items: Sequence[Any]) -> tuple[Sequence[Any], str | None]:
        token = self.body.get("NextToken") or "0"
        if not token.isdigit() or len(token) > 9:  # sdmaker's tokens are offsets it handed out
            raise ControlPlaneError(f"Invalid NextToken {excerpt(token, 80)}: pass the NextToken of the previous "
                                    "answer.", "InvalidNextTokenException", field="nextToken")
        limit = self.body.get("MaxResults", _MAX_PAGE)
        if not 1 <= limit <= _MAX_PAGE:
            raise _invalid("maxResults", f"1 validation error detected: Value '{limit}' at 'maxResults' failed to "
                           f"satisfy constraint: Member must have value between 1 and {_MAX_PAGE}")
        start = int(token)
        return items[start:start + limit], str(start + limit) if start + limit < len(items) else None


async def _apply(c: _Ctx, endpoint: str, variant: str, target: ScalingTarget | None) -> None:
    """Hand ``target`` to the endpoint's backend (which may refuse it) and note who scales it."""
    native = await c.manager.apply_scaling(endpoint, variant, target)
    c.manager.scaling.refresh()
    c.manager.scaling.set_native(endpoint, native)


def _endpoint_exists(c: _Ctx, endpoint: str, variant: str) -> None:
    if c.manager.db.endpoint(endpoint) is None:
        raise _invalid("resourceId", f"Could not find endpoint {endpoint!r} to register as a scalable target "
                       f"(resource ID endpoint/{endpoint}/variant/{variant}): create the endpoint first")


# -- scalable targets ------------------------------------------------------------------------------------


async def _register_scalable_target(c: _Ctx) -> dict[str, Any]:
    resource = c.resource()
    assert resource is not None
    rid, endpoint, variant = resource
    _endpoint_exists(c, endpoint, variant)
    old = c.store.target(rid)
    low, high = c.body.get("MinCapacity"), c.body.get("MaxCapacity")
    if old is None and (low is None or high is None):
        raise _invalid("minCapacity" if low is None else "maxCapacity",
                       "MinCapacity and MaxCapacity are required to register a new scalable target")
    low = old.min_capacity if low is None and old is not None else low
    high = old.max_capacity if high is None and old is not None else high
    assert low is not None and high is not None
    if low < 0:
        raise _invalid("minCapacity", f"1 validation error detected: Value '{low}' at 'minCapacity' failed to "
                       "satisfy constraint: Member must have value greater than or equal to 0")
    if high < 1:
        raise _invalid("maxCapacity", f"1 validation error detected: Value '{high}' at 'maxCapacity' failed to "
                       "satisfy constraint: Member must have value greater than or equal to 1")
    if low > high:
        raise _invalid("minCapacity", f"Minimum capacity ({low}) cannot be greater than maximum capacity ({high})")
    suspended = {key: bool((c.body.get("SuspendedState") or {}).get(key, (old.suspended if old else {}).get(key)))
                 for key in ("DynamicScalingInSuspended", "DynamicScalingOutSuspended", "ScheduledScalingSuspended")}
    policies = tuple(p.tracking() for p in c.store.policies(rid))
    target = ScalingTarget(low, high, policies, scale_out_suspended=suspended["DynamicScalingOutSuspended"],
                           scale_in_suspended=suspended["DynamicScalingInSuspended"])
    native = await c.manager.apply_scaling(endpoint, variant, target)  # refuses what the backend cannot hold
    rec = TargetRecord(rid, low, high, c.body.get("RoleARN") or (old.role_arn if old else c.default_role()), suspended,
                       old.arn if old else c.target_arn(), old.created if old else time.time())
    c.store.put_target(rec)
    c.manager.scaling.refresh()
    c.manager.scaling.set_native(endpoint, native)
    return {"ScalableTargetARN": rec.arn}


async def _deregister_scalable_target(c: _Ctx) -> dict[str, Any]:
    resource = c.resource()
    assert resource is not None
    rid, endpoint, variant = resource
    if c.store.target(rid) is None:
        raise c.not_registered(rid)
    c.store.delete_target(rid)
    if c.manager.db.endpoint(endpoint) is not None:
        try:
            await _apply(c, endpoint, variant, None)
            if c.manager.instance_counts(endpoint)[1] == 0:  # nothing would start an instance any more
                c.manager.scaling.scale(endpoint, variant, 1, cause="the scalable target was deregistered while "
                                        "the variant had no instance")
        except SdmakerError as exc:  # the target is gone either way
            logger.warning("endpoint %s: deregistering its scalable target: %s", endpoint, exc)
    c.manager.scaling.refresh()
    return {}


def _target_json(c: _Ctx, rec: TargetRecord) -> dict[str, Any]:
    return {"ServiceNamespace": SERVICE_NAMESPACE, "ResourceId": rec.resource_id,
            "ScalableDimension": SCALABLE_DIMENSION, "MinCapacity": rec.min_capacity,
            "MaxCapacity": rec.max_capacity, "RoleARN": rec.role_arn, "CreationTime": rec.created,
            "SuspendedState": rec.suspended, "ScalableTargetARN": rec.arn}


async def _describe_scalable_targets(c: _Ctx) -> dict[str, Any]:
    c.resource(required=False)
    wanted = c.body.get("ResourceIds")
    records = c.store.targets(list(wanted) if wanted else None)
    page, token = c.page(records)
    out: dict[str, Any] = {"ScalableTargets": [_target_json(c, r) for r in page]}
    if token:
        out["NextToken"] = token
    return out


# -- scaling policies ------------------------------------------------------------------------------------


def _check_policy(body: dict[str, Any]) -> dict[str, Any]:
    """The validated ``TargetTrackingScalingPolicyConfiguration`` of a PutScalingPolicy request."""
    ptype = body.get("PolicyType", "StepScaling")  # AWS's default
    if ptype != "TargetTrackingScaling":
        raise _invalid("policyType", f"PolicyType {ptype} is not supported by sdmaker: use TargetTrackingScaling "
                       "(with a TargetTrackingScalingPolicyConfiguration)")
    for other in ("StepScalingPolicyConfiguration", "PredictiveScalingPolicyConfiguration"):
        if body.get(other) is not None:
            raise _invalid(other[0].lower() + other[1:], f"{other} cannot be combined with PolicyType "
                           "TargetTrackingScaling")
    member = "targetTrackingScalingPolicyConfiguration"
    config = body.get("TargetTrackingScalingPolicyConfiguration")
    if config is None:
        raise _invalid(member, "TargetTrackingScalingPolicyConfiguration is required for a TargetTrackingScaling "
                       "policy")
    if config.get("CustomizedMetricSpecification") is not None:
        raise _invalid(f"{member}.customizedMetricSpecification", "CustomizedMetricSpecification is not supported "
                       f"by sdmaker: use a PredefinedMetricSpecification ({' or '.join(METRICS)})")
    spec = config.get("PredefinedMetricSpecification")
    if spec is None:
        raise _invalid(f"{member}.predefinedMetricSpecification", "PredefinedMetricSpecification is required: "
                       f"PredefinedMetricType {' or '.join(METRICS)}")
    metric = spec["PredefinedMetricType"]
    if metric not in METRICS:
        raise _invalid(f"{member}.predefinedMetricSpecification.predefinedMetricType",
                       f"PredefinedMetricType {metric} does not apply to a SageMaker endpoint variant: use "
                       f"{' or '.join(METRICS)}")
    value = config["TargetValue"]
    if not (math.isfinite(value) and value > 0):
        raise _invalid(f"{member}.targetValue", f"1 validation error detected: Value '{value}' at "
                       f"'{member}.targetValue' failed to satisfy constraint: Member must be greater than 0")
    for key in ("ScaleOutCooldown", "ScaleInCooldown"):
        cooldown = config.get(key)
        if cooldown is not None and not 0 <= cooldown <= _MAX_COOLDOWN_S:
            path = f"{member}.{key[0].lower()}{key[1:]}"
            raise _invalid(path, f"1 validation error detected: Value '{cooldown}' at '{path}' failed to satisfy "
                           f"constraint: Member must have value between 0 and {_MAX_COOLDOWN_S} (seconds)")
    return {k: v for k, v in config.items() if v is not None}


async def _put_scaling_policy(c: _Ctx) -> dict[str, Any]:
    resource = c.resource()
    assert resource is not None
    rid, endpoint, variant = resource
    name = str(c.body["PolicyName"])
    if not name.isprintable():
        raise _invalid("policyName", "PolicyName must consist of printable characters")
    config = _check_policy(c.body)
    target = c.store.target(rid)
    if target is None:
        raise c.not_registered(rid)
    if c.manager.db.endpoint(endpoint) is None:
        raise _invalid("resourceId", f"Could not find endpoint {endpoint!r} of scalable target {rid}")
    others = [p for p in c.store.policies(rid) if p.name != name]
    candidate = PolicyRecord(rid, name, "", config, time.time())
    current = c.store.scaling_target(rid)
    assert current is not None
    scaling = ScalingTarget(current.min_capacity, current.max_capacity,
                            tuple(p.tracking() for p in [*others, candidate]),
                            current.scale_out_suspended, current.scale_in_suspended)
    native = await c.manager.apply_scaling(endpoint, variant, scaling)
    rec = c.store.put_policy(rid, name, c.policy_arn(rid, name), config)
    c.manager.scaling.refresh()
    c.manager.scaling.set_native(endpoint, native)
    return {"PolicyARN": rec.arn, "Alarms": []}


def _policy_json(rec: PolicyRecord) -> dict[str, Any]:
    return {"PolicyARN": rec.arn, "PolicyName": rec.name, "ServiceNamespace": SERVICE_NAMESPACE,
            "ResourceId": rec.resource_id, "ScalableDimension": SCALABLE_DIMENSION,
            "PolicyType": "TargetTrackingScaling", "TargetTrackingScalingPolicyConfiguration": rec.config,
            "Alarms": [], "CreationTime": rec.created}


async def _describe_scaling_policies(c: _Ctx) -> dict[str, Any]:
    resource = c.resource(required=False)
    names = c.body.get("PolicyNames")
    records = [p for p in c.store.policies(resource[0] if resource else None) if not names or p.name in names]
    page, token = c.page(records)
    out: dict[str, Any] = {"ScalingPolicies": [_policy_json(p) for p in page]}
    if token:
        out["NextToken"] = token
    return out


async def _delete_scaling_policy(c: _Ctx) -> dict[str, Any]:
    resource = c.resource()
    assert resource is not None
    rid, endpoint, variant = resource
    name = str(c.body["PolicyName"])
    if not c.store.delete_policy(rid, name):
        raise ControlPlaneError(f"No scaling policy found for service namespace: {SERVICE_NAMESPACE}, resource ID: "
                                f"{rid}, scalable dimension: {SCALABLE_DIMENSION}, policy name: {name}",
                                "ObjectNotFoundException", kind=EndpointNotFoundError)
    if c.manager.db.endpoint(endpoint) is not None:
        try:
            await _apply(c, endpoint, variant, c.store.scaling_target(rid))
        except SdmakerError as exc:  # fewer policies never needs more than the backend had
            logger.warning("endpoint %s: deleting scaling policy %s: %s", endpoint, name, exc)
    c.manager.scaling.refresh()
    return {}


# -- activities --------------------------------------------------------------------------------------------


def _activity_json(rec: ActivityRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"ActivityId": rec.id, "ServiceNamespace": SERVICE_NAMESPACE,
                           "ResourceId": rec.resource_id, "ScalableDimension": SCALABLE_DIMENSION,
                           "Description": rec.description, "Cause": rec.cause, "StartTime": rec.started,
                           "StatusCode": rec.status}
    if rec.ended is not None:
        out["EndTime"] = rec.ended
    if rec.message:
        out["StatusMessage"] = rec.message
    return out


async def _describe_scaling_activities(c: _Ctx) -> dict[str, Any]:
    resource = c.resource(required=False)
    records = c.store.activities(resource[0] if resource else None)
    page, token = c.page(records)
    out: dict[str, Any] = {"ScalingActivities": [_activity_json(a) for a in page]}
    if token:
        out["NextToken"] = token
    return out


OPERATIONS: dict[str, Callable[[_Ctx], Awaitable[dict[str, Any]]]] = {
    "RegisterScalableTarget": _register_scalable_target,
    "DeregisterScalableTarget": _deregister_scalable_target,
    "DescribeScalableTargets": _describe_scalable_targets,
    "PutScalingPolicy": _put_scaling_policy,
    "DescribeScalingPolicies": _describe_scaling_policies,
    "DeleteScalingPolicy": _delete_scaling_policy,
    "DescribeScalingActivities": _describe_scaling_activities,
}


async def autoscaling_api(request: Request, body: dict[str, Any]) -> JSONResponse:
    """Dispatch one ``AnyScaleFrontendService.<Operation>`` call."""
    target = request.headers.get("x-amz-target", "")
    operation = target.removeprefix(TARGET_PREFIX)
    handler = OPERATIONS.get(operation)
    metrics = request.state.metrics
    if handler is None:
        metrics.control.labels(operation=operation or "-", status="400").inc()
        return control_plane_error("UnknownOperationException", f"Unknown operation {excerpt(target, 80)}; sdmaker's "
                                   "Application Auto Scaling supports: " + ", ".join(OPERATIONS))
    ctx = _Ctx(body, request.state.settings, request.state.manager)
    try:
        check_input(operation, body, SERVICE)  # botocore's input shape: types, required members, enums (._shapes)
        result = await handler(ctx)
    except ControlPlaneError as exc:
        metrics.control.labels(operation=operation, status=str(exc.status)).inc()
        return control_plane_error(exc.aws_code, exc.message, exc.status, error_code=exc.code)
    except SdmakerError as exc:
        metrics.control.labels(operation=operation, status="400").inc()
        return control_plane_error("ValidationException", exc.message, error_code=exc.code)
    metrics.control.labels(operation=operation, status="200").inc()
    return JSONResponse(result, media_type=_JSON11)
