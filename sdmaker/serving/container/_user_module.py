"""Finding ``code/inference.py`` and binding its hooks, with the Hugging Face toolkit's rules (contract §2.2-2.3).

* The module is ``SAGEMAKER_PROGRAM`` minus ``.py`` (unset or empty: ``inference``), looked up in
  ``<model_dir>/code`` only. The toolkit imports whatever ``find_spec`` finds on ``sys.path``; sdmaker
  restricts the search to the artifact's own ``code/`` folder so that a same-named package installed on
  the machine is never run as model code. ``code/`` is still put first on ``sys.path`` so the module's
  own sibling imports (``code/utils.py``, ``code/lib/``) work.
* Each of ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``, ``transform_fn`` is optional and may
  take a trailing ``context``; the arity decides, any other arity is the toolkit's ``TypeError``.
* ``transform_fn`` together with any of the other three request hooks is the toolkit's ``ValueError``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from sdmaker.serving._protocol import module_name

__all__ = ["HOOK_ARITY", "Context", "Hook", "UserHooks", "load_user_module", "module_name"]

logger = logging.getLogger(__name__)

#: Number of parameters of each default hook *with* its trailing context (toolkit signatures minus self).
HOOK_ARITY: dict[str, int] = {
    "model_fn": 2,       # load(model_dir, context=None)
    "input_fn": 3,       # preprocess(input_data, content_type, context=None)
    "predict_fn": 3,     # predict(data, model, context=None)
    "output_fn": 3,      # postprocess(prediction, accept, context=None)
    "transform_fn": 5,   # transform_fn(model, input_data, content_type, accept, context=None)
}


class _Metrics:
    """Stand-in for MMS ``context.metrics``: user code that records metrics keeps working (values are logged)."""

    def add_time(self, name: str, value: float, *_: Any, **__: Any) -> None:
        logger.debug("metric %s = %s ms", name, value)

    def add_counter(self, name: str, value: float = 1, *_: Any, **__: Any) -> None:
        logger.debug("metric %s += %s", name, value)

    def add_metric(self, name: str, value: Any, *_: Any, **__: Any) -> None:
        logger.debug("metric %s = %s", name, value)


class _RequestProcessor:
    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = dict(headers)

    def get_request_properties(self) -> dict[str, str]:
        return dict(self._headers)

    def get_request_property(self, key: str) -> str | None:
        return _lookup(self._headers, key)


def _lookup(headers: Mapping[str, str], key: str) -> str | None:
    want = key.lower()
    for k, v in headers.items():
        if k.lower() == want:
            return v
    return None


@dataclass
class Context:
    """What the toolkit passes as ``context``: the MMS ``Context`` API, one object per request.

    ``model_fn`` gets a context without request headers. Request/response header methods accept the
    MMS form with a leading batch index (``get_request_header(0, name)``,
    ``set_response_header(0, name, value)``) and the short form without it.
    """

    system_properties: dict[str, Any]
    request_headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    response_status: int | None = None
    response_phrase: str = ""
    metrics: _Metrics = field(default_factory=_Metrics)

    @property
    def request_processor(self) -> list[_RequestProcessor]:
        return [_RequestProcessor(self.request_headers)]

    @property
    def model_name(self) -> str:
        return str(self.system_properties.get("model_name", "model"))

    def get_request_id(self, idx: int = 0) -> str | None:
        return _lookup(self.request_headers, "X-Amzn-SageMaker-Inference-Id") or _lookup(
            self.request_headers, "X-Request-Id")

    def get_request_header(self, *args: Any) -> str | None:
        """``get_request_header(idx, name)`` (MMS) or ``get_request_header(name)``; case-insensitive."""
        key = args[-1]
        return _lookup(self.request_headers, str(key))

    def get_all_request_header(self, idx: int = 0) -> dict[str, str]:
        return dict(self.request_headers)

    def set_response_header(self, *args: Any) -> None:
        """``set_response_header(idx, name, value)`` (MMS) or ``set_response_header(name, value)``."""
        key, value = args[-2], args[-1]
        self.response_headers[str(key)] = str(value)

    def get_response_headers(self, idx: int = 0) -> dict[str, str]:
        return dict(self.response_headers)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.response_status = int(code)
        self.response_phrase = phrase

    def set_response_content_type(self, idx: int, value: str) -> None:
        """Accepted for compatibility; as in the toolkit, the response Content-Type is the resolved Accept."""

    def get_response_content_type(self, idx: int = 0) -> str | None:
        return None

    def for_request(self, headers: Mapping[str, str]) -> Context:
        """A fresh per-request context sharing this one's system properties."""
        return Context(system_properties=self.system_properties, request_headers=dict(headers))


@dataclass(frozen=True)
class Hook:
    """A user hook and whether it takes the trailing context."""

    name: str
    fn: Callable[..., Any]
    takes_context: bool

    def __call__(self, *args: Any, context: Context) -> Any:
        return self.fn(*args, context) if self.takes_context else self.fn(*args)


@dataclass
class UserHooks:
    """The hooks ``inference.py`` defines (``None`` = use the default) and where they came from."""

    module: ModuleType | None = None
    model_fn: Hook | None = None
    input_fn: Hook | None = None
    predict_fn: Hook | None = None
    output_fn: Hook | None = None
    transform_fn: Hook | None = None

    @property
    def defined(self) -> list[str]:
        return [n for n in HOOK_ARITY if getattr(self, n) is not None]


def _bind(name: str, fn: Any) -> Hook:
    if not callable(fn):
        raise TypeError(f"{name} in the inference script is not a function (got {type(fn).__name__})")
    with_context = HOOK_ARITY[name]
    given = len(inspect.signature(fn).parameters)
    if given == with_context:
        return Hook(name, fn, True)
    if given == with_context - 1:
        return Hook(name, fn, False)
    # The toolkit's exact text (handler_service.function_extra_arg).
    raise TypeError(f"{getattr(fn, '__name__', name)} definition takes {with_context - 1} or {with_context} "
                    f"arguments but {given} were given.")


def load_user_module(model_dir: Path, program: str | None) -> UserHooks:
    """Import ``<model_dir>/code/<module>`` if present and bind its hooks; no module -> all defaults.

    Errors raised while importing the user's module propagate unchanged (they are the model's own
    load errors and end up in the worker's status file).
    """
    name = module_name(program)
    code_dir = (Path(model_dir) / "code").resolve()
    spec = importlib.machinery.PathFinder.find_spec(name, [str(code_dir)]) if code_dir.is_dir() else None
    if spec is None or spec.loader is None:
        logger.info("No inference script implementation was found at `%s` in %s. Default implementation of "
                    "all functions will be used.", name, code_dir)
        return UserHooks()
    logger.info("Inference script implementation found at `%s` (%s).", name, spec.origin)
    if str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # as importlib.import_module would; needed for pickling/dataclasses
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise
    found = {n: getattr(module, n, None) for n in HOOK_ARITY}
    if found["transform_fn"] is not None and any(found[n] is not None for n in ("input_fn", "predict_fn",
                                                                                 "output_fn")):
        raise ValueError("Cannot use transform_fn implementation in conjunction with input_fn, predict_fn, "
                         "and/or output_fn implementation")
    hooks = UserHooks(module=module, **{n: _bind(n, fn) for n, fn in found.items() if fn is not None})
    for n in HOOK_ARITY:
        logger.info("`%s` %s", n, "implementation found; it replaces the default" if getattr(hooks, n)
                    else "not defined; the default is used")
    return hooks
