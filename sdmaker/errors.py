"""All of sdmaker's own exceptions, in one place.

Every error a user can provoke is a leaf of this tree. Leaves also inherit the builtin they
resemble, so callers may catch either (``except FileNotFoundError`` still works)::

    SdmakerError
    ├── InvalidRequestError (ValueError)        bad field in a generation request / CLI option
    │   └── UnsupportedFormatError                   Content-Type / Accept the handler cannot (de)serialize
    ├── ConfigError (ValueError)                bad setting or environment value
    ├── ModelError
    │   ├── ModelNotFoundError (FileNotFoundError)   no such store name, folder or hub id
    │   ├── ModelFormatError (ValueError)            folder is not a loadable diffusers model
    │   ├── PickleRefusedError (PermissionError)     pickle weights without --allow-pickle
    │   ├── OfflineError (ConnectionError)           a hub id asked for while offline
    │   └── RequirementsError                        code/requirements.txt not satisfied and not installable
    ├── StoreError
    │   ├── StoreIntegrityError                      a blob does not match its digest
    │   └── ModelExistsError (FileExistsError)       import under a taken name
    ├── ArchiveError (ValueError)                    unsafe or broken archive
    ├── S3Error (OSError)                            an S3 call failed (mapped from botocore)
    ├── EngineError                                  generation failed inside the engine
    │   ├── OutOfMemoryError (MemoryError)
    │   └── GenerationCancelledError                 a queued or running generation was cancelled (503)
    └── ServingError                                 endpoint / server level failures
        ├── EndpointNotFoundError (LookupError)       no endpoint (endpoint config, SageMaker model) of that name
        ├── EndpointExistsError (FileExistsError)     an endpoint (endpoint config, SageMaker model) of that name exists
        ├── ControlPlaneError                        a SageMaker control-plane refusal in AWS's shape (``__type``)
        ├── S3ApiError                               a refusal of the built-in S3, answered as S3's XML ``<Error>``
        ├── QueueFullError                           backpressure: retry later (HTTP 503)
        ├── InvocationTimeoutError (TimeoutError)
        ├── EndpointNotReadyError                    endpoint exists but is not InService
        ├── PayloadTooLargeError (ValueError)        request body over the endpoint's limit (413)
        ├── WorkerStartError                         a worker process failed to load its model
        ├── InvocationFailedError                    the model code answered an error (SageMaker ModelError)
        ├── JobNotFoundError (LookupError)           no asynchronous inference job of that id (404)
        └── AuthenticationError (PermissionError)    missing or bad SigV4 signature / bearer token

Errors carry structured fields as well as a message, so the server can put them in a JSON
body and the client can rebuild the same class from its ``code``: every error response of the daemon
carries the header ``X-Sdmaker-Error-Code: <code>`` (:data:`ERROR_CODE_HEADER`) beside AWS's own error
type, and :func:`error_class_for_code` maps it back. Clients never read the message text to decide.

Messages quote user input through :func:`excerpt`: a few hundred characters at most, never a lone
surrogate, so an error about a 6 MiB prompt stays small and always encodes as UTF-8.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = [
    "ERROR_CODE_HEADER",
    "ArchiveError",
    "ConfigError",
    "ControlPlaneError",
    "EndpointExistsError",
    "EndpointNotFoundError",
    "AuthenticationError",
    "EndpointNotReadyError",
    "EngineError",
    "GenerationCancelledError",
    "InvocationFailedError",
    "JobNotFoundError",
    "PayloadTooLargeError",
    "WorkerStartError",
    "InvalidRequestError",
    "InvocationTimeoutError",
    "ModelError",
    "ModelExistsError",
    "ModelFormatError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "OfflineError",
    "OutOfMemoryError",
    "PickleRefusedError",
    "RequirementsError",
    "QueueFullError",
    "S3ApiError",
    "S3Error",
    "SdmakerError",
    "ServingError",
    "StoreError",
    "StoreIntegrityError",
    "UnsupportedFormatError",
    "error_class_for_code",
    "excerpt",
    "utf8_safe",
]

#: The response header naming the :mod:`sdmaker.errors` class of a daemon error (its ``code``).
ERROR_CODE_HEADER = "X-Sdmaker-Error-Code"

#: Longest quote of user input in an error message (the input itself may be megabytes).
EXCERPT_CHARS = 200


def utf8_safe(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes, so it always encodes as UTF-8.

    JSON allows ``"\\ud800"``; Python decodes it to a str that UTF-8 refuses, which would turn an
    error answer into a 500 while it is being rendered.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


_REPR = reprlib.Repr()
_REPR.maxstring = EXCERPT_CHARS
_REPR.maxother = EXCERPT_CHARS
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short ``repr`` of user input for an error message: at most ``limit`` characters, UTF-8 safe.

    Bounded in time and depth as well (``reprlib``), so deeply nested or huge inputs cost nothing.
    """
    text = _REPR.repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return utf8_safe(text)


class SdmakerError(Exception):
    """Base class for all sdmaker errors.

    ``code`` is a stable machine-readable name (the class name by default) used on the wire.
    ``http_status`` is what the server answers when this error reaches a client.
    """

    http_status: int = 500

    def __init__(self, message: str, **fields: Any) -> None:
        message = utf8_safe(message)
        super().__init__(message)
        self.message = message
        self.fields: dict[str, Any] = fields

    @property
    def code(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for HTTP bodies."""
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        for key, value in self.fields.items():
            out[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
        return out


# --- request / config errors -------------------------------------------------------------------


class InvalidRequestError(SdmakerError, ValueError):
    """A request field is out of range or of the wrong type.

    Example: ``InvalidRequestError("height=1000 ...", field="height", value=1000, allowed="64..2048, multiple of 8")``
    """

    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, value: Any = None, allowed: str | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message, field=field, value=value, allowed=allowed, errors=errors or [])
        self.field = field
        self.value = value
        self.allowed = allowed


class UnsupportedFormatError(InvalidRequestError):
    """No decoder for the request's Content-Type or no encoder for its Accept (HF toolkit wording)."""


class ConfigError(SdmakerError, ValueError):
    """A setting (environment variable, config file, CLI option) is invalid."""

    http_status = 400


# --- model errors -------------------------------------------------------------------------------


class ModelError(SdmakerError):
    """A model could not be found or loaded."""

    http_status = 400


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No model under that store name, path or hub id."""

    http_status = 404


class ModelFormatError(ModelError, ValueError):
    """The folder exists but is not a loadable diffusers Stable Diffusion model."""


class PickleRefusedError(ModelError, PermissionError):
    """Weights in a pickle format (.bin/.ckpt/.pt/.pth) were found and pickle is not allowed.

    Unpickling runs arbitrary code; users opt in with ``--allow-pickle``.
    """

    http_status = 403


class OfflineError(ModelError, ConnectionError):
    """A hub id was requested but there is no network and no local cache for it."""


class RequirementsError(ModelError):
    """A model's ``code/requirements.txt`` is not satisfied and cannot be installed (offline, refused, or pip failed).

    ``fields["missing"]`` lists the unsatisfied requirement lines.
    """


# --- store errors -------------------------------------------------------------------------------


class StoreError(SdmakerError):
    """The local model store failed."""


class StoreIntegrityError(StoreError):
    """A stored blob does not match its sha256: the store was modified outside sdmaker."""


class ModelExistsError(StoreError, FileExistsError):
    """A model with this name already exists in the store."""

    http_status = 409


class ArchiveError(SdmakerError, ValueError):
    """An archive is unsafe (path traversal, links out, devices, too large) or unreadable."""

    http_status = 400


class S3Error(SdmakerError, OSError):
    """An S3 operation failed; ``fields`` carry the bucket, key and the AWS error code."""

    http_status = 502


# --- engine errors ------------------------------------------------------------------------------


class EngineError(SdmakerError):
    """Generation failed inside the engine."""


class OutOfMemoryError(EngineError, MemoryError):
    """The device ran out of memory for this request (try fewer images or a smaller size)."""

    http_status = 507


class GenerationCancelledError(EngineError):
    """The generation was cancelled before it finished (its caller gave up, or the worker is draining).

    Raised by :meth:`sdmaker.engine.BatchJob.cancel`'s job at the next step boundary; retrying is safe.
    """

    http_status = 503


# --- serving errors -----------------------------------------------------------------------------


class ServingError(SdmakerError):
    """Endpoint or server level failure."""


class EndpointNotFoundError(ServingError, LookupError):
    """No endpoint of that name (the control plane also uses it for a missing endpoint config or SageMaker model)."""

    http_status = 404


class EndpointExistsError(ServingError, FileExistsError):
    """An endpoint of that name exists already (or, from the control plane, an endpoint config or SageMaker model)."""

    http_status = 409


class ControlPlaneError(ServingError):
    """A SageMaker control-plane refusal, answered as ``{"__type": aws_code, "message": ...}``.

    The message keeps AWS's own wording, because the SageMaker SDK matches on it ("Could not find
    endpoint" means absent). ``kind`` is the :mod:`sdmaker.errors` class the refusal stands for; its name
    is this error's wire :attr:`code` (``X-Sdmaker-Error-Code``), so :mod:`sdmaker.client` raises e.g.
    :class:`EndpointNotFoundError` without reading the text. Without a ``kind``, a 4xx refusal is bad
    input (:class:`InvalidRequestError`).

    Example: ``ControlPlaneError('Could not find endpoint "arn:..".', kind=EndpointNotFoundError)``
    """

    def __init__(self, message: str, aws_code: str = "ValidationException", status: int = 400, *,
                 kind: type[SdmakerError] | None = None, **fields: Any) -> None:
        super().__init__(message, aws_code=aws_code, **fields)
        self.aws_code = aws_code
        self.status = self.http_status = status
        self.kind: type[SdmakerError] = kind or (InvalidRequestError if 400 <= status < 500 else ServingError)

    @property
    def code(self) -> str:
        kind = getattr(self, "kind", None)  # absent on an instance rebuilt from its fields
        return kind.__name__ if kind is not None else type(self).__name__


class S3ApiError(ServingError):
    """A refusal of the built-in S3 server, answered as S3's ``<Error><Code>aws_code</Code>...`` XML body.

    ``aws_code`` and the status are S3's own (``NoSuchKey`` 404, ``BucketAlreadyOwnedByYou`` 409, ...), since
    boto3 maps them to its exception classes; the fields (``bucket``, ``key``, ...) go into the body too.

    Example: ``S3ApiError("NoSuchKey", "The specified key does not exist.", 404, bucket="b", key="k")``
    """

    def __init__(self, aws_code: str, message: str, status: int = 400, **fields: Any) -> None:
        super().__init__(message, aws_code=aws_code, **fields)
        self.aws_code = aws_code
        self.status = self.http_status = status


class QueueFullError(ServingError):
    """The endpoint's queue is full; retry after ``retry_after`` seconds."""

    http_status = 503


class InvocationTimeoutError(ServingError, TimeoutError):
    """The invocation did not finish within the endpoint's timeout."""

    http_status = 504


class EndpointNotReadyError(ServingError):
    """The endpoint exists but is not ``InService`` (still creating, updating, or failed)."""

    http_status = 400


class ModelNotReadyError(ServingError):
    """A multi-model endpoint is still loading the target model (SageMaker ``ModelNotReadyException``, 429):
    the load goes on, retry shortly; ``target_model`` names it."""

    http_status = 429


class PayloadTooLargeError(ServingError, ValueError):
    """The request body exceeds the endpoint's limit (SageMaker: 6 MiB); rejected before the model runs."""

    http_status = 413


class WorkerStartError(ServingError):
    """A worker process could not load its model; ``message`` carries the worker's own error."""


class InvocationFailedError(ServingError):
    """The model code answered an error (SageMaker ``ModelError``); ``original_status`` is its HTTP status."""

    http_status = 424


class JobNotFoundError(ServingError, LookupError):
    """No asynchronous inference job of that id (``GET /sdmaker/v1/jobs/{id}``); ``job_id`` names it."""

    http_status = 404


class AuthenticationError(ServingError, PermissionError):
    """The request carries no valid SigV4 signature or bearer token."""

    http_status = 403


def _all_subclasses(cls: type[SdmakerError]) -> list[type[SdmakerError]]:
    out: list[type[SdmakerError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_class_for_code(code: str) -> type[SdmakerError]:
    """Map a wire ``code`` back to its exception class (``SdmakerError`` when unknown)."""
    for cls in _all_subclasses(SdmakerError):
        if cls.__name__ == code:
            return cls
    return SdmakerError
