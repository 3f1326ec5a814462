"""The CloudWatch Logs subset the SageMaker SDK reads while it waits for a transform job.

Why: ``Transformer.transform()`` and ``.wait()`` default to ``logs=True``, which tails the job's logs with
``DescribeLogStreams`` / ``GetLogEvents`` in the ``/aws/sagemaker/TransformJobs`` log group. Without an
answer the SDK would call AWS (no network: a long hang). The daemon answers those two calls (JSON 1.1,
``X-Amz-Target: Logs_20140328.<Operation>``) from each job's log file, one stream per job
(``<job>/sdmaker``); ``sdmaker env`` points ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS`` at the daemon.

Events are the log file's lines; a line without its own time (worker output) carries the time of the
line before it, so the SDK's (timestamp, skip) positions stay valid between calls.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sdmaker.errors import ControlPlaneError, EndpointNotFoundError

__all__ = ["LOGS_OPERATIONS", "LOGS_TARGET_PREFIX", "TRANSFORM_LOG_GROUP"]

LOGS_TARGET_PREFIX = "Logs_20140328."
TRANSFORM_LOG_GROUP = "/aws/sagemaker/TransformJobs"
_STREAM_SUFFIX = "/sdmaker"
#: at most this many events per GetLogEvents answer (AWS: 10,000 or 1 MB)
_MAX_EVENTS = 10_000
_MAX_READ = 4 * 1024 * 1024
_STAMP = re.compile(rb"^--- (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d) ")


def _not_found(what: str) -> ControlPlaneError:
    return ControlPlaneError(f"The specified {what} does not exist.", "ResourceNotFoundException",
                             kind=EndpointNotFoundError)


def _group(body: dict[str, Any]) -> None:
    if body.get("logGroupName") != TRANSFORM_LOG_GROUP:
        raise _not_found("log group")


def _events(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_READ)
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    stamp = 0  # the job log starts with a timed line (job created); times never go back
    for line in data.splitlines():
        match = _STAMP.match(line)
        if match:
            parsed = time.mktime(time.strptime(match.group(1).decode(), "%Y-%m-%dT%H:%M:%S"))
            stamp = max(stamp, int(parsed * 1000))
        if line.strip():
            out.append({"timestamp": stamp, "message": line.decode("utf-8", errors="replace"),
                        "ingestionTime": stamp})
    return out


async def _describe_log_streams(c: Any) -> dict[str, Any]:
    _group(c.body)
    prefix = str(c.body.get("logStreamNamePrefix") or "")
    jobs = c.manager.transforms
    streams = []
    for job in jobs.db.jobs():
        stream = job.name + _STREAM_SUFFIX
        path = jobs.log_file(job.name)
        if stream.startswith(prefix) and path.exists():
            streams.append({"logStreamName": stream, "creationTime": int(job.created * 1000),
                            "lastIngestionTime": int(path.stat().st_mtime * 1000),
                            "arn": f"arn:aws:logs:{c.settings.region}:{c.settings.account_id}:log-group:"
                                   f"{TRANSFORM_LOG_GROUP}:log-stream:{stream}"})
    streams.sort(key=lambda s: s["logStreamName"])
    return {"logStreams": streams[:int(c.body.get("limit") or 50)]}


async def _get_log_events(c: Any) -> dict[str, Any]:
    _group(c.body)
    stream = str(c.body.get("logStreamName") or "")
    jobs = c.manager.transforms
    name = stream.removesuffix(_STREAM_SUFFIX)
    if not stream.endswith(_STREAM_SUFFIX) or jobs.db.job(name) is None:
        raise _not_found("log stream")
    events = _events(jobs.log_file(name))
    start = c.body.get("startTime")
    if isinstance(start, int):
        events = [e for e in events if e["timestamp"] >= start]
    token = str(c.body.get("nextToken") or "f/0")
    offset = int(token[2:]) if token[:2] in ("f/", "b/") and token[2:].isdigit() else 0
    page = events[offset:offset + min(int(c.body.get("limit") or _MAX_EVENTS), _MAX_EVENTS)]
    return {"events": page, "nextForwardToken": f"f/{offset + len(page)}", "nextBackwardToken": f"b/{offset}"}


LOGS_OPERATIONS: dict[str, Callable[[Any], Awaitable[dict[str, Any]]]] = {
    "DescribeLogStreams": _describe_log_streams,
    "GetLogEvents": _get_log_events,
}
