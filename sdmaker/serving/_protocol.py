"""The contract between the daemon and its worker processes: the only module both sides import.

A worker process (:mod:`sdmaker.serving.container`) is told everything it needs in one
:class:`WorkerConfig`, serialized once as one JSON line on its stdin, whether it starts fresh or was a
warm standby that already imported torch. It reports back through ``GET /ping`` and a status file
(:class:`ServerState`), its exit code (``EXIT_*``) and response headers (:data:`SEEDS_HEADER`). The
daemon marks a body it already validated with :data:`VALIDATED_HEADER`; :func:`trusts_validation` is
the one place a worker decides whether to believe that.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FRAMES_MEDIA_TYPE", "JOB_ID_HEADER", "PROGRESS_HEADER", "FrameReader", "encode_frame", "DEADLINE_HEADER", "EXIT_BAD_CONFIG", "EXIT_BIND_FAILED", "EXIT_LOAD_FAILED", "READY_MARK", "SEEDS_HEADER",
           "TIMEOUT_STATUS", "VALIDATED_HEADER", "ServerState", "WorkerConfig", "deadline_seconds", "module_name",
           "trusts_validation"]

#: Exit codes of a worker process: bad configuration, model load failed (status file says why), port unavailable.
EXIT_BAD_CONFIG = 2
EXIT_LOAD_FAILED = 3
EXIT_BIND_FAILED = 4
#: First word of the line a warm standby prints on stdout once its imports are done.
READY_MARK = "sdmaker-standby-ready"
#: Response header of the default handler: one seed per generated image (the daemon counts images with it).
SEEDS_HEADER = "X-Sdmaker-Seeds"
#: Request header the daemon sets on a default-handler body it validated and rewrote as canonical JSON.
VALIDATED_HEADER = "X-Sdmaker-Validated"
#: Request header the daemon sets on every invocation: seconds left of the invocation's budget. The default
#: handler stops the generation at the next step boundary once they have passed (the worker carries on).
#: Honoured from anyone: a caller can only shorten its own request.
DEADLINE_HEADER = "X-Sdmaker-Deadline-Seconds"
#: Status of a worker's answer to a request stopped at its deadline (with ``X-Sdmaker-Error-Code:
#: InvocationTimeoutError``); the daemon answers it as the invocation timeout it is.
TIMEOUT_STATUS = 408


#: Request header naming the job an invocation belongs to: the daemon sets it on the worker request (and answers
#: it on every synchronous invocation, so a client can watch ``/sdmaker/v1/jobs/{id}/events``); a client may
#: choose the id itself by sending it.
JOB_ID_HEADER = "X-Sdmaker-Job-Id"
#: Request header by which the daemon asks a worker for its answer as a stream of frames (value ``frames``):
#: progress events while the request runs, body chunks of a streaming ``predict_fn``, then the reply.
PROGRESS_HEADER = "X-Sdmaker-Progress"
#: Content-Type of a framed answer (:func:`encode_frame`).
FRAMES_MEDIA_TYPE = "application/x-sdmaker-frames"


def encode_frame(head: Mapping[str, Any], payload: bytes = b"") -> bytes:
    """One frame of a framed worker answer: a JSON line (``head`` plus ``length``), then ``length`` raw bytes.

    Frame kinds (``head["kind"]``): ``event`` (``type`` and ``data``: a progress event of the job), ``chunk``
    (payload: the next piece of a streamed body) and ``reply`` (``status``, ``headers``, ``content_type``;
    payload: the body, empty when it was streamed as chunks). ``reply`` is the last frame.
    """
    line = json.dumps({**head, "length": len(payload)}, separators=(",", ":")).encode()
    return line + b"\n" + payload


class FrameReader:
    """Incremental parser of :func:`encode_frame` output: :meth:`feed` bytes, get complete frames back."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._head: dict[str, Any] | None = None

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self._buffer += data
        frames: list[tuple[dict[str, Any], bytes]] = []
        while True:
            if self._head is None:
                end = self._buffer.find(b"\n")
                if end < 0:
                    return frames
                head = json.loads(bytes(self._buffer[:end]))
                if not isinstance(head, dict) or not isinstance(head.get("length"), int):
                    raise ValueError("malformed frame header")
                self._head = head
                del self._buffer[:end + 1]
            length = int(self._head["length"])
            if len(self._buffer) < length:
                return frames
            frames.append((self._head, bytes(self._buffer[:length])))
            del self._buffer[:length]
            self._head = None

    @property
    def pending(self) -> bool:
        """Whether bytes of an incomplete frame are held (a stream that ended here was cut short)."""
        return bool(self._buffer) or self._head is not None


class ServerState(str, enum.Enum):
    """A worker's model state, as its status file and ``/ping`` report it."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class WorkerConfig(BaseModel):
    """Everything one worker process needs, sent as one JSON line (fresh start and warm standby alike).

    ``environment`` is the complete process environment the worker must run with (``None``: keep the
    current one, as ``sdmaker serve`` in the foreground does); ``log_file`` is where its stdout and stderr
    go (``None``: keep them).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path
    port: int = Field(ge=0, le=65535)
    host: str = "127.0.0.1"
    model_name: str | None = None
    #: content digest when the caller resolved the model already (skips hashing the weights at load)
    model_digest: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    #: > 0: batch UNet steps of up to this many concurrent requests (and take that many at once)
    max_batch: int = Field(default=0, ge=0)
    #: handler threads (at least ``max_batch``)
    threads: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=6 * 1024 * 1024, ge=1)
    #: require ``Authorization: Bearer <token>`` on every route but ``/ping``
    token: str | None = None
    allow_pickle: bool = False
    #: after a failed load, keep answering ``/ping`` 500 this long, then exit :data:`EXIT_LOAD_FAILED`
    fail_grace_s: float = Field(default=2.0, ge=0)
    status_file: Path | None = None
    worker_id: str | None = None
    #: believe :data:`VALIDATED_HEADER` (set only by the daemon that spawns this worker)
    trust_daemon_validation: bool = False
    environment: dict[str, str] | None = None
    log_file: Path | None = None

    @property
    def handler_threads(self) -> int:
        """Threads handlers run in: enough for ``max_batch`` requests to reach the batcher together."""
        return max(self.threads, self.max_batch)

    def to_line(self) -> bytes:
        """The one wire form: a JSON line."""
        return self.model_dump_json().encode() + b"\n"

    @classmethod
    def from_line(cls, line: str | bytes) -> WorkerConfig:
        return cls.model_validate_json(line)


def trusts_validation(config: WorkerConfig, headers: Mapping[str, str]) -> bool:
    """True when this request's body was validated by the daemon that spawned this worker.

    Believed only by workers the daemon started (``trust_daemon_validation``), never by ``sdmaker serve``;
    such a worker answers ``/invocations`` only to holders of its per-worker secret
    (:mod:`sdmaker.serving._worker_secret`), so the header cannot come from anyone but its daemon.
    """
    if not config.trust_daemon_validation:
        return False
    value = next((v for k, v in headers.items() if k.lower() == VALIDATED_HEADER.lower()), None)
    return value == "1"


def deadline_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds left of this request's budget from :data:`DEADLINE_HEADER`; None when absent or not a number."""
    value = next((v for k, v in headers.items() if k.lower() == DEADLINE_HEADER.lower()), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(seconds, 0.0) if seconds == seconds else None  # NaN: ignored


def module_name(program: str | None) -> str:
    """The handler module in ``code/`` (``SAGEMAKER_PROGRAM``; unset or empty means ``inference``, contract 1.7).

    Both sides use this rule: the daemon to know whether an endpoint runs the default handler, the worker
    to load the user module.
    """
    name = (program or "").strip() or "inference"
    return name[:-3] if name.endswith(".py") else name
