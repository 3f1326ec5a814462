"""The SageMaker control-plane subset (JSON 1.1, ``POST /`` with ``X-Amz-Target: SageMaker.<Operation>``).

Enough for ``boto3.client("sagemaker")`` (and its ``endpoint_in_service`` waiter) and for the SageMaker
Python SDK's ``Model.deploy`` / ``Predictor.delete_endpoint``: CreateModel, DescribeModel, DeleteModel,
CreateEndpointConfig, DescribeEndpointConfig, DeleteEndpointConfig, CreateEndpoint, DescribeEndpoint,
ListEndpoints, UpdateEndpoint, UpdateEndpointWeightsAndCapacities (``DesiredInstanceCount``), DeleteEndpoint
(contract section 5). Errors are
``{"__type": "ValidationException", "message": ...}`` with AWS's own texts, because the SDK matches on
them (e.g. "Could not find endpoint" means "absent").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from sdmaker.config import Settings
from sdmaker.errors import (
    ERROR_CODE_HEADER,
    ControlPlaneError,
    EndpointExistsError,
    EndpointNotFoundError,
    EndpointNotReadyError,
    SdmakerError,
    excerpt,
    utf8_safe,
)
from sdmaker.serving.daemon._cloudwatch_logs import LOGS_OPERATIONS, LOGS_TARGET_PREFIX
from sdmaker.serving.daemon._endpoints import FORBIDDEN_ENV, EndpointManager
from sdmaker.serving.daemon._limits import check_endpoint_config, check_model
from sdmaker.serving.daemon._shapes import check_input
from sdmaker.serving.daemon._transform_api import TRANSFORM_OPERATIONS

__all__ = ["OPERATIONS", "ControlPlaneError", "control_plane", "control_plane_error"]

logger = logging.getLogger(__name__)

_JSON11 = "application/x-amz-json-1.1"
_IMAGE = "sdmaker/local-worker:latest"
#: an error message longer than this is cut (messages quote inputs; AWS's own are a few hundred bytes)
_MAX_MESSAGE = 1024


def control_plane_error(code: str, message: str, status: int = 400, *,
                        error_code: str = "InvalidRequestError") -> JSONResponse:
    """AWS's error shape (``__type`` + message) plus ``X-Sdmaker-Error-Code: <error_code>`` for sdmaker.client.

    The message is made UTF-8 safe (a lone surrogate from the request is written as an escape) and bounded,
    so rendering an error never fails and never echoes a large input.
    """
    message = utf8_safe(message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "...")
    return JSONResponse({"__type": code, "message": message}, status_code=status, media_type=_JSON11,
                        headers={ERROR_CODE_HEADER: error_code})


class _Ctx:
    """What an operation handler needs: the request body, the settings and the endpoint manager."""

    def __init__(self, body: dict[str, Any], settings: Settings, manager: EndpointManager) -> None:
        self.body, self.settings, self.manager = body, settings, manager

    def arn(self, kind: str, name: str) -> str:
        # AWS shows names lower-cased in ARNs (contract section 5).
        return f"arn:aws:sagemaker:{self.settings.region}:{self.settings.account_id}:{kind}/{name.lower()}"

    def name(self, field: str) -> str:
        """A name member; present and well formed, because :func:`check_input` ran first."""
        return str(self.body[field])


# -- models ------------------------------------------------------------------------------------------


async def _create_model(c: _Ctx) -> dict[str, Any]:
    name = c.name("ModelName")
    container = c.body.get("PrimaryContainer") or (c.body.get("Containers") or [None])[0]
    if not isinstance(container, dict):
        raise ControlPlaneError("Either PrimaryContainer or Containers must be provided.")
    check_model(c.body, c.settings)  # caps: environment size, numbers, string lengths (._limits)
    env = container.get("Environment") or {}
    if not isinstance(env, dict) or len(env) > 100:
        raise ControlPlaneError("Environment must be a map of at most 100 entries.")
    refused = sorted(set(env) & FORBIDDEN_ENV)
    if refused:
        # sdmaker runs only code that comes with the deployed model artifact (code/inference.py).
        raise ControlPlaneError(f"Environment variable(s) {', '.join(refused)} are not allowed: they would load "
                                "code from outside the model artifact; put code in the model's code/ folder.")
    if not c.manager.db.put("models", name, c.body):
        raise ControlPlaneError(f'Cannot create already existing model "{c.arn("model", name)}".', kind=EndpointExistsError)
    return {"ModelArn": c.arn("model", name)}


def _model(c: _Ctx) -> tuple[str, dict[str, Any], float]:
    name = c.name("ModelName")
    rec = c.manager.db.get("models", name)
    if rec is None:
        raise ControlPlaneError(f'Could not find model "{c.arn("model", name)}".', kind=EndpointNotFoundError)
    return name, rec.body, rec.created


async def _describe_model(c: _Ctx) -> dict[str, Any]:
    name, body, created = _model(c)
    out = {"ModelName": name, "ModelArn": c.arn("model", name), "CreationTime": created,
           "ExecutionRoleArn": body.get("ExecutionRoleArn"),
           "EnableNetworkIsolation": bool(body.get("EnableNetworkIsolation", False))}
    for key in ("PrimaryContainer", "Containers"):
        if key in body:
            out[key] = body[key]
    return {k: v for k, v in out.items() if v is not None}


async def _delete_model(c: _Ctx) -> dict[str, Any]:
    name, _, _ = _model(c)
    c.manager.db.delete("models", name)
    return {}


# -- endpoint configs ----------------------------------------------------------------------------------


async def _create_endpoint_config(c: _Ctx) -> dict[str, Any]:
    name = c.name("EndpointConfigName")
    variants: list[dict[str, Any]] = c.body["ProductionVariants"]  # 1..10 structures (check_input)
    models: dict[str, Any] = {}
    for variant in variants:
        model = variant.get("ModelName")
        record = c.manager.db.get("models", model) if model else None
        if record is None:
            raise ControlPlaneError(f'Could not find model "{c.arn("model", str(model))}".', kind=EndpointNotFoundError)
        container = record.body.get("PrimaryContainer") or (record.body.get("Containers") or [{}])[0]
        models[str(model)] = (container.get("Environment") or {}) if isinstance(container, dict) else {}
    check_endpoint_config(c.body, c.settings, models)  # caps: instance counts, timeouts, variants (._limits)
    if len(variants) > 1:
        logger.warning("endpoint config %s has %d variants: sdmaker serves the first (%s) only", name,
                       len(variants), variants[0].get("VariantName"))
    if not c.manager.db.put("endpoint_configs", name, c.body):
        raise ControlPlaneError(
            f'Cannot create already existing endpoint configuration "{c.arn("endpoint-config", name)}".',
            kind=EndpointExistsError)
    return {"EndpointConfigArn": c.arn("endpoint-config", name)}


def _config(c: _Ctx) -> tuple[str, dict[str, Any], float]:
    name = c.name("EndpointConfigName")
    rec = c.manager.db.get("endpoint_configs", name)
    if rec is None:
        raise ControlPlaneError(f'Could not find endpoint configuration "{c.arn("endpoint-config", name)}".',
                                kind=EndpointNotFoundError)
    return name, rec.body, rec.created


async def _describe_endpoint_config(c: _Ctx) -> dict[str, Any]:
    name, body, created = _config(c)
    out = {"EndpointConfigName": name, "EndpointConfigArn": c.arn("endpoint-config", name),
           "ProductionVariants": body["ProductionVariants"], "CreationTime": created}
    for key in ("AsyncInferenceConfig", "DataCaptureConfig", "KmsKeyId"):
        if key in body:
            out[key] = body[key]
    return out


async def _delete_endpoint_config(c: _Ctx) -> dict[str, Any]:
    name, _, _ = _config(c)
    c.manager.db.delete("endpoint_configs", name)
    return {}


# -- endpoints -----------------------------------------------------------------------------------------


async def _create_endpoint(c: _Ctx) -> dict[str, Any]:
    name = c.name("EndpointName")
    config, _, _ = _config(c)
    try:
        c.manager.create(name, config)
    except EndpointExistsError:
        raise ControlPlaneError(f'Cannot create already existing endpoint "{c.arn("endpoint", name)}".',
                                kind=EndpointExistsError) from None
    return {"EndpointArn": c.arn("endpoint", name)}


def _endpoint_name(c: _Ctx) -> str:
    name = c.name("EndpointName")
    if c.manager.db.endpoint(name) is None:
        raise ControlPlaneError(f'Could not find endpoint "{c.arn("endpoint", name)}".', kind=EndpointNotFoundError)
    return name


async def _describe_endpoint(c: _Ctx) -> dict[str, Any]:
    rec = c.manager.require(_endpoint_name(c))
    config = c.manager.db.get("endpoint_configs", rec.config_name)
    out: dict[str, Any] = {"EndpointName": rec.name, "EndpointArn": c.arn("endpoint", rec.name),
                           "EndpointConfigName": rec.config_name, "EndpointStatus": rec.status,
                           "CreationTime": rec.created, "LastModifiedTime": rec.modified}
    if rec.failure_reason:
        out["FailureReason"] = rec.failure_reason
    if config is not None and "AsyncInferenceConfig" in config.body:
        out["AsyncInferenceConfig"] = config.body["AsyncInferenceConfig"]
    if config is not None:
        variants = []
        current, wanted = c.manager.instance_counts(rec.name)  # serving now, and asked for (scaled or initial)
        for v in config.body["ProductionVariants"][:1]:
            variants.append({
                "VariantName": v.get("VariantName", "AllTraffic"),
                "DeployedImages": [{"SpecifiedImage": _IMAGE, "ResolvedImage": _IMAGE, "ResolutionTime": rec.created}],
                "CurrentWeight": float(v.get("InitialVariantWeight", 1.0)),
                "DesiredWeight": float(v.get("InitialVariantWeight", 1.0)),
                "CurrentInstanceCount": current, "DesiredInstanceCount": wanted})
        out["ProductionVariants"] = variants
    return out


async def _list_endpoints(c: _Ctx) -> dict[str, Any]:
    records = c.manager.db.endpoints()
    contains = c.body.get("NameContains")
    status = c.body.get("StatusEquals")
    records = [r for r in records if (not contains or contains in r.name) and (not status or r.status == status)]
    key = {"Name": lambda r: r.name, "Status": lambda r: r.status}.get(c.body.get("SortBy", "CreationTime"),
                                                                         lambda r: r.created)
    records.sort(key=key, reverse=c.body.get("SortOrder", "Descending") == "Descending")
    token = c.body.get("NextToken") or "0"
    if not token.isdigit() or len(token) > 9:  # sdmaker's tokens are offsets it handed out
        raise ControlPlaneError(f"Invalid pagination token {excerpt(token, 80)}: pass the NextToken of the previous "
                                "ListEndpoints answer.", field="nextToken")
    start = int(token)
    limit = int(c.body.get("MaxResults") or 10)
    page = records[start:start + limit]
    out: dict[str, Any] = {"Endpoints": [
        {"EndpointName": r.name, "EndpointArn": c.arn("endpoint", r.name), "CreationTime": r.created,
         "LastModifiedTime": r.modified, "EndpointStatus": r.status} for r in page]}
    if start + limit < len(records):
        out["NextToken"] = str(start + limit)
    return out


async def _update_endpoint(c: _Ctx) -> dict[str, Any]:
    name = _endpoint_name(c)
    config, _, _ = _config(c)
    try:
        c.manager.update(name, config)
    except EndpointNotReadyError:
        raise ControlPlaneError(f'Cannot update in-progress endpoint "{c.arn("endpoint", name)}".',
                                kind=EndpointNotReadyError) from None
    return {"EndpointArn": c.arn("endpoint", name)}


async def _update_endpoint_weights_and_capacities(c: _Ctx) -> dict[str, Any]:
    """Only ``DesiredInstanceCount`` has an effect (sdmaker serves one variant, so weights do not matter)."""
    name = _endpoint_name(c)
    for i, wanted in enumerate(c.body["DesiredWeightsAndCapacities"], 1):
        if wanted.get("DesiredInstanceCount") is None:
            continue
        count = int(wanted["DesiredInstanceCount"])
        if count == 0:
            target = c.manager.scaling.store.scaling_target(f"endpoint/{name}/variant/{wanted['VariantName']}")
            if target is None or target.min_capacity > 0:
                raise ControlPlaneError(
                    "DesiredInstanceCount 0 needs a scalable target with MinCapacity 0 (application-autoscaling "
                    "RegisterScalableTarget), which starts an instance when a request arrives (at "
                    f"'desiredWeightsAndCapacities.{i}.member.desiredInstanceCount')",
                    field=f"desiredWeightsAndCapacities.{i}.member.desiredInstanceCount")
        await asyncio.to_thread(c.manager.check_instance_count, name, count,
                                f"desiredWeightsAndCapacities.{i}.member.desiredInstanceCount")
        try:
            c.manager.update_instance_count(name, str(wanted["VariantName"]), count)
        except EndpointNotReadyError:
            raise ControlPlaneError(f'Cannot update in-progress endpoint "{c.arn("endpoint", name)}".',
                                    kind=EndpointNotReadyError) from None
    return {"EndpointArn": c.arn("endpoint", name)}


async def _delete_endpoint(c: _Ctx) -> dict[str, Any]:
    await c.manager.delete(_endpoint_name(c))
    return {}


OPERATIONS: dict[str, Callable[[_Ctx], Awaitable[dict[str, Any]]]] = {
    "CreateModel": _create_model,
    "DescribeModel": _describe_model,
    "DeleteModel": _delete_model,
    "CreateEndpointConfig": _create_endpoint_config,
    "DescribeEndpointConfig": _describe_endpoint_config,
    "DeleteEndpointConfig": _delete_endpoint_config,
    "CreateEndpoint": _create_endpoint,
    "DescribeEndpoint": _describe_endpoint,
    "ListEndpoints": _list_endpoints,
    "UpdateEndpoint": _update_endpoint,
    "UpdateEndpointWeightsAndCapacities": _update_endpoint_weights_and_capacities,
    "DeleteEndpoint": _delete_endpoint,
    **TRANSFORM_OPERATIONS,  # CreateTransformJob, DescribeTransformJob, ListTransformJobs, StopTransformJob
}


async def control_plane(request: Request, body: dict[str, Any]) -> JSONResponse:
    """Dispatch one ``SageMaker.<Operation>`` call."""
    target = request.headers.get("x-amz-target", "")
    operation = target.removeprefix("SageMaker.")
    handler = OPERATIONS.get(operation) if target.startswith("SageMaker.") else None
    if target.startswith(LOGS_TARGET_PREFIX):  # CloudWatch Logs subset: transform job logs (the SDK's wait())
        operation = target.removeprefix(LOGS_TARGET_PREFIX)
        handler = LOGS_OPERATIONS.get(operation)
    metrics = request.state.metrics
    if handler is None:
        metrics.control.labels(operation=operation or "-", status="400").inc()
        return control_plane_error("UnknownOperationException", f"Unknown operation {target!r}; sdmaker supports: "
                                   + ", ".join(OPERATIONS))
    ctx = _Ctx(body, request.state.settings, request.state.manager)
    try:
        # the one shape check; handlers then trust member types and check only what the model cannot say
        check_input(operation, body)  # botocore's input shape: types, required members, lengths, enums (._shapes)
        result = await handler(ctx)
    except ControlPlaneError as exc:
        metrics.control.labels(operation=operation, status=str(exc.status)).inc()
        return control_plane_error(exc.aws_code, exc.message, exc.status, error_code=exc.code)
    except SdmakerError as exc:
        metrics.control.labels(operation=operation, status="400").inc()
        return control_plane_error("ValidationException", exc.message, error_code=exc.code)
    metrics.control.labels(operation=operation, status="200").inc()
    return JSONResponse(result, media_type=_JSON11)
