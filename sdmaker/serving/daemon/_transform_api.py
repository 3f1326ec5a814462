"""The batch transform control-plane operations: CreateTransformJob, DescribeTransformJob, ListTransformJobs,
StopTransformJob (registered in :data:`~._control_plane.OPERATIONS`; the jobs run in :mod:`._transform`).

The input shape is checked against botocore's model first (:mod:`._shapes`); this module checks what the
model cannot say: the model exists, the S3 locations are ``s3://``, and the request asks for nothing
sdmaker does not do (``DataProcessing`` filters, data capture, KMS keys, RecordIO/TFRecord splitting,
augmented manifests): those are refused with a ValidationException naming the member, never ignored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from sdmaker.errors import ControlPlaneError, EndpointExistsError, EndpointNotFoundError, excerpt
from sdmaker.serving.daemon._transform import describe_times
from sdmaker.serving.daemon._transform_state import JobRecord, TransformStatus
from sdmaker.serving.daemon._variant import FORBIDDEN_ENV

__all__ = ["TRANSFORM_OPERATIONS"]


class _Ctx(Protocol):
    body: dict[str, Any]
    settings: Any
    manager: Any

    def arn(self, kind: str, name: str) -> str: ...


#: (member path, why) of the CreateTransformJob members sdmaker refuses when present
_UNSUPPORTED: tuple[tuple[tuple[str, ...], str], ...] = (
    (("DataProcessing",), "input/output filters and joining are not supported"),
    (("DataCaptureConfig",), "batch data capture is not supported"),
    (("TransformOutput", "KmsKeyId"), "KMS encryption of outputs is not supported"),
    (("TransformResources", "VolumeKmsKeyId"), "KMS volume encryption is not supported"),
)


def _lower(path: tuple[str, ...]) -> str:
    return ".".join(p[:1].lower() + p[1:] for p in path)


def _check_supported(body: dict[str, Any]) -> None:
    for path, why in _UNSUPPORTED:
        value: Any = body
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value not in (None, {}, ""):
            raise ControlPlaneError(f"{'.'.join(path)} is not supported by sdmaker: {why}; remove it from the "
                                    "request", field=_lower(path))
    tin = body["TransformInput"]
    source = (tin.get("DataSource") or {}).get("S3DataSource")
    if not isinstance(source, dict):
        raise ControlPlaneError("TransformInput.DataSource.S3DataSource is required (sdmaker reads S3 input only)",
                                field="transformInput.dataSource.s3DataSource")
    if source.get("S3DataType") not in ("S3Prefix", "ManifestFile"):
        raise ControlPlaneError(f"TransformInput.DataSource.S3DataSource.S3DataType {source.get('S3DataType')!r} is "
                                "not supported by sdmaker: use S3Prefix or ManifestFile",
                                field="transformInput.dataSource.s3DataSource.s3DataType")
    if tin.get("SplitType") not in (None, "None", "Line"):
        raise ControlPlaneError(f"TransformInput.SplitType {tin['SplitType']!r} is not supported by sdmaker: use "
                                "None or Line", field="transformInput.splitType")
    locations: list[tuple[tuple[str, ...], Any]] = [
        (("TransformInput", "DataSource", "S3DataSource", "S3Uri"), source.get("S3Uri")),
        (("TransformOutput", "S3OutputPath"), body["TransformOutput"].get("S3OutputPath"))]
    for path, uri in locations:
        if not isinstance(uri, str) or not uri.startswith("s3://") or len(uri) <= len("s3://") or \
                uri[len("s3://"):].startswith("/"):
            raise ControlPlaneError(f"{'.'.join(path)} must be an s3://bucket/key URI, got {excerpt(uri, 80)}",
                                    field=_lower(path))
    refused = sorted(set(body.get("Environment") or {}) & FORBIDDEN_ENV)
    if refused:
        raise ControlPlaneError(f"Environment variable(s) {', '.join(refused)} are not allowed: they would load "
                                "code from outside the model artifact", field="environment")


def _job(c: _Ctx) -> JobRecord:
    name = str(c.body["TransformJobName"])
    job = c.manager.transforms.db.job(name)
    if job is None:
        raise ControlPlaneError(f"Could not find requested job with name {name}", "ResourceNotFound",
                                kind=EndpointNotFoundError)
    return job


async def _create(c: _Ctx) -> dict[str, Any]:
    body = c.body
    name = str(body["TransformJobName"])
    _check_supported(body)
    model = str(body["ModelName"])
    if c.manager.db.get("models", model) is None:
        raise ControlPlaneError(f'Could not find model "{c.arn("model", model)}".', kind=EndpointNotFoundError)
    count = int(body["TransformResources"].get("InstanceCount") or 1)
    limit = int(getattr(c.settings, "max_instances", 0) or 0)
    if limit and count > limit:
        raise ControlPlaneError(
            f"1 validation error detected: Value '{count}' at 'transformResources.instanceCount' failed to satisfy "
            f"constraint: Member must have value less than or equal to {limit} (worker processes this machine may "
            "hold; raise SDMAKER_MAX_INSTANCES to allow more)", field="transformResources.instanceCount")
    if not c.manager.transforms.create(name, dict(body)):
        raise ControlPlaneError(f"Job name must be unique within an AWS account and region, and a job with this name "
                                f"already exists ({c.arn('transform-job', name)})", "ResourceInUse",
                                kind=EndpointExistsError)
    return {"TransformJobArn": c.arn("transform-job", name)}


_ECHOED = ("ModelClientConfig", "Environment", "TransformInput", "TransformOutput", "TransformResources",
           "DataProcessing", "ExperimentConfig")


async def _describe(c: _Ctx) -> dict[str, Any]:
    job = _job(c)
    body = job.body
    out: dict[str, Any] = {"TransformJobName": job.name, "TransformJobArn": c.arn("transform-job", job.name),
                           "TransformJobStatus": job.status.value, "ModelName": body["ModelName"]}
    if job.failure_reason:
        out["FailureReason"] = job.failure_reason
    for key in ("MaxConcurrentTransforms", "MaxPayloadInMB", "BatchStrategy"):
        if body.get(key) is not None:
            out[key] = body[key]
    for key in _ECHOED:
        if body.get(key) is not None:
            out[key] = body[key]
    times = describe_times(job)
    times.pop("LastModifiedTime", None)
    out.update(times)
    return out


async def _list(c: _Ctx) -> dict[str, Any]:
    b = c.body
    jobs = c.manager.transforms.db.jobs()

    def keep(j: JobRecord) -> bool:
        return ((not b.get("NameContains") or str(b["NameContains"]) in j.name)
                and (not b.get("StatusEquals") or j.status.value == b["StatusEquals"])
                and (b.get("CreationTimeAfter") is None or j.created > _epoch(b["CreationTimeAfter"]))
                and (b.get("CreationTimeBefore") is None or j.created < _epoch(b["CreationTimeBefore"]))
                and (b.get("LastModifiedTimeAfter") is None or j.modified > _epoch(b["LastModifiedTimeAfter"]))
                and (b.get("LastModifiedTimeBefore") is None or j.modified < _epoch(b["LastModifiedTimeBefore"])))

    jobs = [j for j in jobs if keep(j)]
    sort_key: Callable[[JobRecord], Any] = {"Name": lambda j: j.name, "Status": lambda j: j.status.value}.get(
        b.get("SortBy", "CreationTime"), lambda j: j.created)
    jobs.sort(key=sort_key, reverse=b.get("SortOrder", "Descending") == "Descending")
    token = b.get("NextToken") or "0"
    if not token.isdigit() or len(token) > 9:
        raise ControlPlaneError(f"Invalid pagination token {excerpt(token, 80)}: pass the NextToken of the previous "
                                "ListTransformJobs answer.", field="nextToken")
    start, limit = int(token), int(b.get("MaxResults") or 10)
    page = jobs[start:start + limit]
    summaries = []
    for j in page:
        item: dict[str, Any] = {"TransformJobName": j.name, "TransformJobArn": c.arn("transform-job", j.name),
                                "CreationTime": j.created, "LastModifiedTime": j.modified,
                                "TransformJobStatus": j.status.value}
        if j.ended is not None:
            item["TransformEndTime"] = j.ended
        if j.failure_reason:
            item["FailureReason"] = j.failure_reason
        summaries.append(item)
    out: dict[str, Any] = {"TransformJobSummaries": summaries}
    if start + limit < len(jobs):
        out["NextToken"] = str(start + limit)
    return out


def _epoch(value: Any) -> float:
    """A botocore timestamp member: epoch seconds (what boto3 sends) or ISO 8601 text."""
    if isinstance(value, (int, float)):
        return float(value)
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ControlPlaneError(f"Invalid timestamp {excerpt(value, 40)}", field="creationTimeAfter") from None


async def _stop(c: _Ctx) -> dict[str, Any]:
    job = _job(c)
    if job.status is TransformStatus.IN_PROGRESS:
        c.manager.transforms.stop(job.name)
    return {}


TRANSFORM_OPERATIONS: dict[str, Callable[[Any], Awaitable[dict[str, Any]]]] = {
    "CreateTransformJob": _create,
    "DescribeTransformJob": _describe,
    "ListTransformJobs": _list,
    "StopTransformJob": _stop,
}
