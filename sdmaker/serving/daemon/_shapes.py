"""The one validation layer for control-plane request shapes: botocore's own SageMaker service model.

Why: each operation used to check its members with its own ``isinstance`` tests, and what they missed
(``ProductionVariants: ["x"]``, ``MaxResults: "x"``, ``NameContains: {}``...) crashed into a 500. AWS
checks every request against the operation's input shape before running it; so does this module, with
the same shapes (``botocore/data/sagemaker/*/service-2.json``, installed with boto3): required members,
types, string/list/map lengths, number ranges, enums and patterns. A wrong type is answered like AWS's
JSON 1.1 front end does (``SerializationException``); a value outside its constraint like its validator
(``ValidationException``, "1 validation error detected: Value 'x' at 'maxResults' failed to satisfy
constraint: ..."). Members the model does not know are ignored, as AWS does (but not nested without bound: a body
nested deeper than any SageMaker shape is refused).

sdmaker deviates from the model on purpose in a few places (:data:`_UNCHECKED`): ``ModelDataUrl`` may be
a local path or ``file://`` URL, ``InstanceType`` may be ``local``/``local_gpu`` (the SageMaker SDK's
local mode), and role ARNs are never used, so any role string is taken.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from sdmaker.errors import ControlPlaneError, excerpt

__all__ = ["check_input", "input_shape"]

#: (shape name, what is not checked): deliberate departures from botocore's model (see the module doc).
_UNCHECKED: dict[str, frozenset[str]] = {
    "Url": frozenset({"pattern"}),
    "RoleArn": frozenset({"pattern"}),
    "ProductionVariantInstanceType": frozenset({"enum"}),
}
#: deeper than this, a value cannot match any SageMaker input shape (and walking it costs stack)
_MAX_DEPTH = 40
_JSON_KIND = {dict: "Start of structure or map", list: "Start of list", str: "STRING_VALUE",
              bool: "Boolean value", int: "NUMBER_VALUE", float: "NUMBER_VALUE", type(None): "null"}
_TYPE_NAME = {"structure": "a structure", "map": "a map", "list": "a list", "string": "a String",
              "integer": "an Integer", "long": "a Long", "float": "a Float", "double": "a Double",
              "boolean": "a Boolean", "timestamp": "a Timestamp", "blob": "a Blob"}


@functools.lru_cache(maxsize=4)
def _model(service: str = "sagemaker") -> Mapping[str, Any]:
    """botocore's service model of ``service`` (loaded once per process, about 0.3 s for SageMaker's)."""
    from botocore.loaders import Loader

    model: Mapping[str, Any] = Loader().load_service_model(service, "service-2")
    return model


def input_shape(operation: str, service: str = "sagemaker") -> str | None:
    """The name of ``operation``'s input shape (``None`` for an operation the model does not know)."""
    op = _model(service)["operations"].get(operation)
    return op["input"]["shape"] if op and "input" in op else None


@functools.lru_cache(maxsize=512)
def _pattern(text: str) -> re.Pattern[str] | None:
    """A botocore pattern compiled for a full match, or ``None`` where it is Java-only syntax (``\\p{L}``)."""
    try:
        return re.compile(f"(?:{text})", re.DOTALL)
    except re.error:
        return None


def _member_path(path: str, name: str) -> str:
    """AWS writes member paths in lower camel case: ``ProductionVariants`` -> ``productionVariants``."""
    name = name[:1].lower() + name[1:]
    return f"{path}.{name}" if path else name


def _shown(value: Any) -> str:
    """The value as AWS quotes it, bounded (an error body never echoes a whole input)."""
    text = value if isinstance(value, str) else excerpt(value, 80)
    return excerpt(text, 80)[1:-1] if isinstance(value, str) else text


def _constraint(path: str, value: Any, constraint: str) -> ControlPlaneError:
    shown = "null" if value is None else f"'{_shown(value)}'"
    return ControlPlaneError(f"1 validation error detected: Value {shown} at '{path}' failed to satisfy "
                             f"constraint: {constraint}", field=path)


def _wrong_type(path: str, value: Any, kind: str) -> ControlPlaneError:
    found = _JSON_KIND.get(type(value), type(value).__name__)
    return ControlPlaneError(f"{found} can not be converted to {_TYPE_NAME.get(kind, kind)} (at '{path}')",
                             "SerializationException", field=path)


def _check(value: Any, shape_name: str, path: str, depth: int, service: str = "sagemaker") -> None:
    shape = _model(service)["shapes"][shape_name]
    kind = shape["type"]
    skip = _UNCHECKED.get(shape_name, frozenset())
    if value is None:
        return  # JSON null: the member is absent (AWS's deserializer treats it so); `required` catches it
    if depth > _MAX_DEPTH:
        raise ControlPlaneError(f"Request nested too deeply at '{path}'", "SerializationException", field=path)
    if kind == "structure":
        if not isinstance(value, dict):
            raise _wrong_type(path, value, kind)
        members = shape.get("members", {})
        for name in shape.get("required", []):
            if value.get(name) is None:
                raise _constraint(_member_path(path, name), None, "Member must not be null")
        for name, member_value in value.items():
            member = members.get(name)
            if member is not None:
                _check(member_value, member["shape"], _member_path(path, name), depth + 1, service)
            elif _deeper_than(member_value, _MAX_DEPTH - depth):
                raise ControlPlaneError(f"Request nested too deeply at '{_member_path(path, str(name))[:80]}'",
                                        "SerializationException", field=path)
        return
    if kind == "list":
        if not isinstance(value, list):
            raise _wrong_type(path, value, kind)
        _length(value, shape, path, "length")
        for i, item in enumerate(value, 1):
            if item is None:
                raise _constraint(f"{path}.{i}.member", None, "Member must not be null")
            _check(item, shape["member"]["shape"], f"{path}.{i}.member", depth + 1, service)
        return
    if kind == "map":
        if not isinstance(value, dict):
            raise _wrong_type(path, value, kind)
        _length(value, shape, path, "length")
        for key, item in value.items():
            _check(key, shape["key"]["shape"], path, depth + 1, service)
            if item is None:
                raise _constraint(f"{path}.{key}", None, "Member must not be null")
            _check(item, shape["value"]["shape"], f"{path}.{excerpt(key, 40)[1:-1]}", depth + 1, service)
        return
    if kind == "string":
        if not isinstance(value, str):
            raise _wrong_type(path, value, kind)
        _length(value, shape, path, "length")
        if "enum" in shape and "enum" not in skip and value not in shape["enum"]:
            raise _constraint(path, value, f"Member must satisfy enum value set: [{', '.join(shape['enum'])}]")
        pattern = _pattern(shape["pattern"]) if "pattern" in shape and "pattern" not in skip else None
        if pattern is not None and pattern.fullmatch(value) is None:
            raise _constraint(path, value, f"Member must satisfy regular expression pattern: {shape['pattern']}")
        return
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, value, kind)
        _range(value, shape, path)
        return
    if kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _wrong_type(path, value, kind)
        _range(value, shape, path)
        return
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _wrong_type(path, value, kind)
        return
    if kind == "timestamp":  # botocore sends epoch seconds; ISO 8601 text is accepted too
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _wrong_type(path, value, kind)
        return
    if kind == "blob" and not isinstance(value, str):
        raise _wrong_type(path, value, kind)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` deep (iterative: no stack, stops early).

    Members the model does not know are ignored, but not walked into without bound.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level >= limit:
                return True
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _length(value: Any, shape: Mapping[str, Any], path: str, what: str) -> None:
    if "min" in shape and len(value) < shape["min"]:
        raise _constraint(path, value, f"Member must have {what} greater than or equal to {shape['min']}")
    if "max" in shape and len(value) > shape["max"]:
        raise _constraint(path, value, f"Member must have {what} less than or equal to {shape['max']}")


def _range(value: float, shape: Mapping[str, Any], path: str) -> None:
    if "min" in shape and value < shape["min"]:
        raise _constraint(path, value, f"Member must have value greater than or equal to {shape['min']}")
    if "max" in shape and value > shape["max"]:
        raise _constraint(path, value, f"Member must have value less than or equal to {shape['max']}")


def check_input(operation: str, body: Mapping[str, Any], service: str = "sagemaker") -> None:
    """Validate ``body`` against ``operation``'s input shape in botocore's model of ``service`` (SageMaker's,
    or ``application-autoscaling``'s for the autoscaling API).

    Raises:
        ControlPlaneError: ``SerializationException`` for a member of the wrong JSON type,
            ``ValidationException`` for a missing required member or a value outside its constraint.
            Messages name the member (AWS's lower-camel path) and quote at most 80 characters of the value.
    """
    shape = input_shape(operation, service)
    if shape is None:
        return
    try:
        _check(dict(body), shape, "", 0, service)
    except RecursionError:
        raise ControlPlaneError("Request nested too deeply", "SerializationException") from None
