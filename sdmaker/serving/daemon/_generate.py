"""One generation through an endpoint, for the daemon's own front ends: the OpenAI Images API and the web UI.

Both speak a :class:`~sdmaker.schema.GenerateRequest` (the one request schema) and run it the way
``InvokeEndpoint`` does (:meth:`EndpointManager.invoke`: admission, the queue, step batching, statistics),
under a job id whose progress events (:mod:`._events`) they read while it runs.

``target`` names either

* an **endpoint** (``sdmaker endpoint list``): the request goes to it, which must be ``InService``; or
* a **store model** (``sdmaker model list``, or a built-in such as ``mini``): the daemon serves it through a
  *managed endpoint* named ``sdmaker-<model>`` (one CPU/GPU worker, created on the first request that needs
  it and waited for, then kept like any endpoint: it is listed, has logs and statistics, restarts with
  the daemon and goes away with ``DeleteEndpoint``). A model that is served already by a managed endpoint
  costs no second load, and a front end never starts processes the operator cannot see.

The endpoint must run sdmaker's default handler (an endpoint with its own ``code/inference.py`` defines
its own input and output, which neither front end can assume).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import (
    EndpointExistsError,
    EndpointNotReadyError,
    InvalidRequestError,
    InvocationFailedError,
    ModelNotFoundError,
    SdmakerError,
    WorkerStartError,
)
from sdmaker.schema import GenerateRequest
from sdmaker.serving.daemon._admission import work_of_body
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._invoke_api import with_fixed_seed
from sdmaker.serving.daemon._live import LiveEndpoint
from sdmaker.serving.daemon._metrics import DaemonMetrics
from sdmaker.serving.daemon._state import EndpointStatus

__all__ = ["MANAGED_PREFIX", "Generated", "check_job_id", "generate", "is_target", "managed_endpoint_name",
           "model_defaults", "new_job_id", "resolve_target"]

logger = logging.getLogger(__name__)

#: Name prefix of the endpoints the daemon creates to serve store models on demand.
MANAGED_PREFIX = "sdmaker-"
#: Instance type of a managed endpoint: accelerated, so it runs on CUDA where there is one (else the CPU).
_MANAGED_INSTANCE = "ml.g5.xlarge"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


@dataclass(frozen=True)
class Generated:
    """The images of one generation and what regenerates them."""

    endpoint: str
    images: list[bytes]
    seeds: list[int]
    format: str
    mime_type: str
    model: str | None
    model_digest: str | None
    scheduler: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)


def new_job_id() -> str:
    import uuid

    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise InvalidRequestError("job id must be 8-64 letters, digits, '-' or '_'", field="job_id",
                                  value=job_id[:80])
    return job_id


def managed_endpoint_name(model: str) -> str:
    """``sdmaker-<model>``, made a valid endpoint name (letters, digits and single hyphens, <= 63 chars).

    A store name that had to change (``my_model.v2``) gets a short hash so two models never share a name.
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-")
    if slug != model or len(MANAGED_PREFIX) + len(slug) > 63:
        slug = f"{slug[:40].strip('-')}-{hashlib.sha256(model.encode()).hexdigest()[:8]}".strip("-")
    return MANAGED_PREFIX + slug


def _is_store_model(settings: Settings, name: str) -> bool:
    from sdmaker.models import BUILTIN_NAMES
    from sdmaker.store import Store

    if name in BUILTIN_NAMES:
        return True
    try:
        return Store(settings.store_dir).exists(name)
    except (OSError, ValueError, SdmakerError):  # not a valid store name
        return False


async def is_target(manager: EndpointManager, settings: Settings, target: str) -> bool:
    """Whether ``target`` names an endpoint or a store model."""
    if manager.db.endpoint(target) is not None:
        return True
    return await asyncio.to_thread(_is_store_model, settings, target)


def _create_managed(manager: EndpointManager, settings: Settings, name: str, model: str) -> None:
    """Register model, endpoint config and endpoint ``name`` serving store model ``model`` (idempotent)."""
    manager.db.put("models", name, {
        "ModelName": name, "ExecutionRoleArn": f"arn:aws:iam::{settings.account_id}:role/sdmaker-managed",
        "PrimaryContainer": {"Image": "sdmaker", "ModelDataUrl": model, "Environment": {}},
        "Tags": [{"Key": "sdmaker:managed", "Value": "true"}]})
    manager.db.put("endpoint_configs", name, {
        "EndpointConfigName": name, "ProductionVariants": [{
            "VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1,
            "InstanceType": _MANAGED_INSTANCE}]})
    try:
        manager.create(name, name)
        logger.info("serving store model %s through managed endpoint %s", model, name)
    except EndpointExistsError:  # another request created it first
        pass


async def resolve_target(manager: EndpointManager, settings: Settings, target: str) -> LiveEndpoint:
    """The live endpoint that serves ``target`` (an endpoint, or a store model via its managed endpoint).

    Raises:
        ModelNotFoundError: ``target`` is neither (HTTP 404).
        EndpointNotReadyError: the endpoint is not ``InService`` (a managed one is waited for first).
        WorkerStartError: the managed endpoint failed to start (its reason).
    """
    if manager.db.endpoint(target) is not None:
        return manager.live_for_invoke(target)
    if not await asyncio.to_thread(_is_store_model, settings, target):
        raise ModelNotFoundError(f"no endpoint or store model named {target!r} (see sdmaker endpoint list and "
                                 "sdmaker model list)", model=target)
    name = managed_endpoint_name(target)
    rec = manager.db.endpoint(name)
    if rec is None or rec.status is EndpointStatus.FAILED:
        if rec is not None:  # a failed managed endpoint is retried from scratch
            await manager.delete(name)
        _create_managed(manager, settings, name, target)
    deadline = time.monotonic() + settings.startup_timeout_s
    while True:
        rec = manager.require(name)
        if rec.status is EndpointStatus.FAILED:
            raise WorkerStartError(f"the managed endpoint {name} for model {target!r} failed to start: "
                                   f"{rec.failure_reason}", endpoint=name)
        rt = manager.live.get(name)
        if rt is not None and rt.pool is not None and rt.status.serving:
            return manager.live_for_invoke(name)
        if time.monotonic() > deadline:
            raise EndpointNotReadyError(f"the managed endpoint {name} for model {target!r} is still starting; "
                                        "retry later", endpoint=name, status=rec.status.value)
        await asyncio.sleep(0.1)


def model_defaults(manager: EndpointManager, endpoint: str) -> dict[str, Any]:
    """The request defaults of the model an endpoint serves (its ``sdmaker.json``); ``{}`` when unknown."""
    rec = manager.db.endpoint(endpoint)
    if rec is None or not rec.model_path:
        return {}
    from pathlib import Path

    try:
        card = json.loads((Path(rec.model_path) / "sdmaker.json").read_text())
    except (OSError, ValueError):
        return {}
    defaults = card.get("defaults") if isinstance(card, dict) else None
    return defaults if isinstance(defaults, dict) else {}


async def _invoke(manager: EndpointManager, rt: LiveEndpoint, body: bytes, headers: dict[str, str], job_id: str,
                  work: Any) -> Any:
    """``manager.invoke`` under ``job_id``, so the invocation's progress lands in that job's event log.

    Where the manager does not take a job id yet, the job's log only gets what this module publishes
    (its end): front ends then show no intermediate progress, and everything else works the same.
    """
    kwargs: dict[str, Any] = {"validated": True, "work": work}
    if "job_id" in inspect.signature(manager.invoke).parameters:
        kwargs["job_id"] = job_id
    return await manager.invoke(rt, body, headers, **kwargs)


async def generate(manager: EndpointManager, metrics: DaemonMetrics, rt: LiveEndpoint, request: GenerateRequest,
                   *, job_id: str) -> Generated:
    """Run ``request`` on ``rt`` under ``job_id``; the job's log ends with ``done`` or ``error`` either way.

    Raises:
        InvalidRequestError: the endpoint runs its own ``code/inference.py``.
        SdmakerError: whatever the invocation raised (admission, timeout, the model's error).
    """
    name = rt.name
    manager.events.open(job_id)
    try:
        if not rt.default_handler:
            raise InvalidRequestError(f"endpoint {name} runs its own code/inference.py; this API needs an endpoint "
                                      "with sdmaker's default handler", field="model", value=name)
        canonical = with_fixed_seed(request.model_dump_json(exclude_unset=True).encode())
        headers = {"content-type": "application/json", "accept": "application/json"}
        with metrics.latency.labels(endpoint=name).time():
            reply = await _invoke(manager, rt, canonical, headers, job_id, work_of_body(canonical))
        if reply.status >= 300:
            original = reply.body[:1024].decode("utf-8", errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                original = str(json.loads(reply.body).get("message", original))
            raise InvocationFailedError(f"the model answered {reply.status}: {original}", endpoint=name,
                                        original_status=reply.status)
        answer = json.loads(reply.body)
        result = Generated(
            endpoint=name, images=[base64.b64decode(b) for b in answer["generated_images"]],
            seeds=[int(s) for s in answer.get("seeds", [])], format=str(answer.get("format", "png")),
            mime_type=str(answer.get("mime_type", "image/png")), model=answer.get("model"),
            model_digest=answer.get("model_digest"), scheduler=answer.get("scheduler"),
            parameters=dict(answer.get("parameters") or {}), timings=dict(answer.get("timings") or {}))
    except SdmakerError as exc:
        status = exc.http_status
        metrics.requests.labels(endpoint=name, status=str(status)).inc()
        metrics.errors.labels(endpoint=name, code=exc.code).inc()
        manager.events.publish(job_id, "error", {"status": status, "code": exc.code, "message": exc.message})
        raise
    except (ValueError, KeyError, TypeError) as exc:  # a default handler always answers this JSON
        manager.events.publish(job_id, "error", {"status": 500, "code": "ServingError",
                                                 "message": f"unexpected answer from the worker: {exc}"})
        raise InvocationFailedError(f"unexpected answer from endpoint {name}: {exc}", endpoint=name) from exc
    metrics.requests.labels(endpoint=name, status="200").inc()
    metrics.images.labels(endpoint=name).inc(len(result.images))
    # the manager's own "done" (when it publishes one) came first and wins: publish() ignores a second end
    manager.events.publish(job_id, "done", {"status": 200, "endpoint": name, "images": len(result.images),
                                            "seeds": result.seeds})
    return result
