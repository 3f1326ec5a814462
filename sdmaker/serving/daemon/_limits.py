"""Caps on what a control-plane call may ask for, checked before anything is stored or started.

Why: ``InitialInstanceCount: 100000`` was accepted, and the daemon would have tried to start 100000
worker processes. Every number and size a caller controls is bounded here, by SageMaker's own limits
where it documents one (names, environment sizes, timeouts, variant count) and by what this machine can
hold otherwise: worker processes per variant (``InitialInstanceCount`` x
``SAGEMAKER_MODEL_SERVER_WORKERS``) at most ``SDMAKER_MAX_INSTANCES`` (default 4 per CPU core, at least
8). A refusal is an :class:`~sdmaker.errors.InvalidRequestError` naming the field and the limit, which
the control plane answers as a ``ValidationException``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import InvalidRequestError

__all__ = ["MAX_ENV_ENTRIES", "MAX_ENV_KEY", "MAX_ENV_VALUE", "MAX_VARIANTS", "check_endpoint_config", "check_model"]

#: SageMaker's ``ContainerDefinition.Environment`` limits (entries, key and value lengths).
MAX_ENV_ENTRIES = 100
MAX_ENV_KEY = 1024
MAX_ENV_VALUE = 1024
#: SageMaker: at most 10 production variants per endpoint configuration.
MAX_VARIANTS = 10
_ENV_KEY = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: Numeric environment variables sdmaker reads: (low, high) inclusive.
_ENV_NUMBERS: dict[str, tuple[float, float]] = {
    "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": (1, 3600),  # SageMaker's longest (async) invocation
    "SDMAKER_MAX_QUEUE": (0, 10_000),
    "SDMAKER_MAX_BATCH": (0, 256),
}
#: Variant fields with SageMaker's documented ranges.
_VARIANT_NUMBERS: dict[str, tuple[float, float]] = {
    "ContainerStartupHealthCheckTimeoutInSeconds": (60, 3600),
    "ModelDataDownloadTimeoutInSeconds": (60, 3600),
    "VolumeSizeInGB": (1, 512),
}
_STRINGS = {"ModelDataUrl": 1024, "Image": 255, "ContainerHostname": 63, "InstanceType": 64, "VariantName": 63,
            "ModelName": 63, "ExecutionRoleArn": 2048}


def _fail(member: str, value: object, constraint: str) -> InvalidRequestError:
    shown = str(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return InvalidRequestError(f"1 validation error detected: Value '{shown}' at '{member}' failed to satisfy "
                               f"constraint: {constraint}", field=member)


def _number(value: object, member: str, low: float, high: float, *, integer: bool = True,
            hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            integer and value != int(value)):
        raise _fail(member, value, f"Member must be {'an integer' if integer else 'a number'}")
    if value < low:
        raise _fail(member, value, f"Member must have value greater than or equal to {low:g}")
    if value > high:
        raise _fail(member, value, f"Member must have value less than or equal to {high:g}{hint}")
    return float(value)


def _string(value: object, member: str, limit: int) -> None:
    if not isinstance(value, str):
        raise _fail(member, value, "Member must be a string")
    if len(value) > limit:
        raise _fail(member, value, f"Member must have length less than or equal to {limit}")


def _container(container: Mapping[str, Any], member: str, settings: Settings) -> None:
    for key, limit in _STRINGS.items():
        if key in container and container[key] is not None:
            _string(container[key], f"{member}.{key[0].lower()}{key[1:]}", limit)
    env = container.get("Environment") or {}
    if not isinstance(env, dict):
        raise _fail(f"{member}.environment", env, "Member must be a map")
    if len(env) > MAX_ENV_ENTRIES:
        raise _fail(f"{member}.environment", f"{len(env)} entries", f"Map must have at most {MAX_ENV_ENTRIES} entries")
    for key, value in env.items():
        if len(key) > MAX_ENV_KEY or not _ENV_KEY.match(key):
            raise _fail(f"{member}.environment", key, f"Map keys must match [a-zA-Z_][a-zA-Z0-9_]* and have length "
                        f"less than or equal to {MAX_ENV_KEY}")
        _string(value, f"{member}.environment.{key}", MAX_ENV_VALUE)
    for key, (low, high) in _ENV_NUMBERS.items():
        raw = str(env.get(key) or "").strip()
        if raw:
            try:
                number = float(raw)
            except ValueError:
                raise _fail(f"{member}.environment.{key}", raw, "Member must be a number") from None
            _number(number, f"{member}.environment.{key}", low, high, integer=key != "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS")
    raw = str(env.get("SAGEMAKER_MODEL_SERVER_WORKERS") or "").strip()
    if raw:
        if not raw.isdigit():
            raise _fail(f"{member}.environment.SAGEMAKER_MODEL_SERVER_WORKERS", raw, "Member must be an integer")
        _number(int(raw), f"{member}.environment.SAGEMAKER_MODEL_SERVER_WORKERS", 1, settings.max_instances,
                hint=" (worker processes this machine may hold; SDMAKER_MAX_INSTANCES)")


def check_model(body: Mapping[str, Any], settings: Settings) -> None:
    """Bounds of a ``CreateModel`` request (containers, environment, strings)."""
    containers = body.get("Containers")
    if containers is not None:
        if not isinstance(containers, list) or not 1 <= len(containers) <= 15:
            raise _fail("containers", containers, "Member must have length between 1 and 15")
        for i, container in enumerate(containers, 1):
            if isinstance(container, dict):
                _container(container, f"containers.{i}.member", settings)
    primary = body.get("PrimaryContainer")
    if isinstance(primary, dict):
        _container(primary, "primaryContainer", settings)
    tags = body.get("Tags")
    if tags is not None and (not isinstance(tags, list) or len(tags) > 50):
        raise _fail("tags", tags, "Member must have length less than or equal to 50")


def check_endpoint_config(body: Mapping[str, Any], settings: Settings,
                          model_env: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Bounds of a ``CreateEndpointConfig`` request; ``model_env`` maps a model name to its Environment
    (the worker count is ``InitialInstanceCount`` x its ``SAGEMAKER_MODEL_SERVER_WORKERS``)."""
    variants = body.get("ProductionVariants")
    if isinstance(variants, list) and len(variants) > MAX_VARIANTS:
        raise _fail("productionVariants", f"{len(variants)} variants",
                    f"Member must have length less than or equal to {MAX_VARIANTS}")
    hint = " (worker processes this machine may hold; raise SDMAKER_MAX_INSTANCES to allow more)"
    for i, variant in enumerate(variants or [], 1):
        member = f"productionVariants.{i}.member"
        if not isinstance(variant, dict):
            raise _fail(member, variant, "Member must be a structure")
        for key in ("VariantName", "ModelName", "InstanceType"):
            if variant.get(key) is not None:
                _string(variant[key], f"{member}.{key[0].lower()}{key[1:]}", _STRINGS[key])
        count = variant.get("InitialInstanceCount", 1)
        _number(count, f"{member}.initialInstanceCount", 1, settings.max_instances, hint=hint)
        if "InitialVariantWeight" in variant:
            _number(variant["InitialVariantWeight"], f"{member}.initialVariantWeight", 0, 1_000_000, integer=False)
        for key, (low, high) in _VARIANT_NUMBERS.items():
            if variant.get(key) is not None:
                _number(variant[key], f"{member}.{key[0].lower()}{key[1:]}", low, high)
        serverless = variant.get("ServerlessConfig")
        if isinstance(serverless, dict):
            if "MaxConcurrency" in serverless:
                _number(serverless["MaxConcurrency"], f"{member}.serverlessConfig.maxConcurrency", 1, 200)
            if "MemorySizeInMB" in serverless:
                _number(serverless["MemorySizeInMB"], f"{member}.serverlessConfig.memorySizeInMB", 1024, 6144)
        env = (model_env or {}).get(str(variant.get("ModelName"))) or {}
        per_instance = str(env.get("SAGEMAKER_MODEL_SERVER_WORKERS") or "1").strip()
        if per_instance.isdigit() and int(count) * max(1, int(per_instance)) > settings.max_instances:
            raise _fail(f"{member}.initialInstanceCount", count,
                        f"InitialInstanceCount x SAGEMAKER_MODEL_SERVER_WORKERS ({int(count)} x {per_instance}) must be "
                        f"less than or equal to {settings.max_instances}{hint}")
    async_config = body.get("AsyncInferenceConfig")
    if isinstance(async_config, dict):
        output = async_config.get("OutputConfig") or {}
        for key in ("S3OutputPath", "S3FailurePath"):
            path = output.get(key) if isinstance(output, dict) else None
            member = f"asyncInferenceConfig.outputConfig.{key[0].lower()}{key[1:]}"
            if path is None and key == "S3OutputPath":
                raise _fail(member, "null", "Member must not be null (asynchronous results are written there)")
            if path is not None and (not isinstance(path, str) or not path.startswith("s3://")
                                     or not path[5:].split("/")[0]):
                raise _fail(member, path, "Member must be an s3://bucket[/prefix] URI (sdmaker writes to S3 only)")
        client = async_config.get("ClientConfig") or {}
        if isinstance(client, dict) and "MaxConcurrentInvocationsPerInstance" in client:
            _number(client["MaxConcurrentInvocationsPerInstance"],
                    "asyncInferenceConfig.clientConfig.maxConcurrentInvocationsPerInstance", 1, 1000)
