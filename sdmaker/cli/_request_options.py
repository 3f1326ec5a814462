"""The request options of ``sdmaker generate`` and ``sdmaker invoke``, derived from the request schema.

One typer option per :class:`~sdmaker.schema.GenerateRequest` field (:func:`sdmaker.schema.request_fields`),
so a field added to the schema is an option of both commands at once, with the schema's description and
limits as its help. Each option is named after its field (``--num-inference-steps``); :data:`ALIASES`
keeps the shorter names the README and scripts use (``--steps``, ``-g``, ``--deep-cache``).

Values are checked by the schema alone (:func:`request_from_options` calls ``parse_request``), not by
typer ranges or choices: an error names the field and its limits as the server's would, and it happens
before torch is imported.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer

from sdmaker.schema import FieldSpec, GenerateRequest, parse_request, request_fields

__all__ = ["ALIASES", "FILE_FIELDS", "request_from_options", "request_options"]

#: Extra option names per field (kept for the README and scripts). A long alias is what ``--help`` shows; the
#: derived ``--field-name`` stays accepted as a hidden twin (two long names in one row are cut off at 80 columns).
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("-p",),
    "negative_prompt": ("-n",),
    "num_inference_steps": ("--steps",),
    "guidance_scale": ("-g",),
    "num_images_per_prompt": ("--num-images",),
    "deep_cache_interval": ("--deep-cache",),
    "loras": ("--lora",),
    "mask_image": ("--mask",),
}

#: Fields whose option takes a file path on the command line (sent as base64, as the schema wants).
FILE_FIELDS: dict[str, str] = {
    "image": "Input image file (PNG/JPEG/WebP) for image-to-image, or inpainting with --mask; width/height default "
             "to its size.",
    "mask_image": "Inpainting mask file, the image's size: white = repaint, black = keep.",
}

#: The help panel the request options are listed under (apart from the command's own options).
_PANEL = "Request (the schema's fields; unset ones take the model's defaults)"

_F = TypeVar("_F", bound=Callable[..., Any])

#: Parameter-name prefix of the hidden twin option (the derived name of a field shown under an alias).
_TWIN = "full_name_of_"


def _help(spec: FieldSpec, override: str | None, also: str | None) -> str:
    text = override or spec.description
    if spec.multiple:
        text += " Repeat the option for a list."
    elif spec.allowed:
        text += f" Allowed: {spec.allowed}."  # not in [brackets]: rich would read "[one of ...]" as markup
    return text + (f" Also {also}." if also else "")


def _options(spec: FieldSpec, override: str | None) -> list[inspect.Parameter]:
    """The field's option (and its hidden twin under the derived name when :data:`ALIASES` has a long one)."""
    scalar = list[spec.type] if spec.multiple else spec.type  # type: ignore[name-defined]
    aliases = ALIASES.get(spec.name, ())
    long_alias = any(a.startswith("--") for a in aliases)
    shown = aliases if long_alias else (*aliases, spec.option)
    common: dict[str, Any] = {"show_default": False, "rich_help_panel": _PANEL}
    if spec.multiple:
        common["metavar"] = "NAME[:SCALE]" if spec.name == "loras" else "<str>"
    params = [inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        scalar | None, typer.Option(*shown, help=_help(spec, override, spec.option if long_alias else None),
                                    **common)])]
    if long_alias:
        params.append(inspect.Parameter(_TWIN + spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[scalar | None, typer.Option(spec.option, hidden=True,
                                                                                         **common)]))
    return params


def _merge_twin(kwargs: dict[str, Any], spec: FieldSpec) -> Any:
    value, twin = kwargs.pop(spec.name, None), kwargs.pop(_TWIN + spec.name, None)
    if value is not None and twin is not None:
        alias = next(a for a in ALIASES[spec.name] if a.startswith("--"))
        raise typer.BadParameter(f"give {alias} or {spec.option}, not both", param_hint=spec.option)
    return twin if value is None else value


def _file_base64(path: str, name: str) -> str:
    """The file at ``path`` as base64 text (the CLI takes files where the schema takes base64)."""
    import base64
    from pathlib import Path

    option = "--mask" if name == "mask_image" else f"--{name}"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint=option) from None
    return base64.b64encode(data).decode("ascii")


def request_options(*, schema: type[GenerateRequest] = GenerateRequest,
                    descriptions: Mapping[str, str] | None = None) -> Callable[[_F], _F]:
    """Decorate a command: one option per field of ``schema``, handed to it as ``request_values``.

    The command declares a ``request_values: dict[str, Any]`` parameter; it receives every field's value
    (None where the option was not given). ``descriptions`` replaces a field's description where the command's
    behaviour differs (``generate`` writes PNG by default). The command's own parameters keep their order:
    its arguments, then the request options, then its other options; their names must not be field names.
    """

    def decorate(command: _F) -> _F:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "request_values"]
        specs = request_fields(schema)
        clash = {p.name for p in own} & {s.name for s in specs}
        if clash:
            raise TypeError(f"{command.__name__}: parameters {sorted(clash)} shadow request fields")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            fields = {spec.name: _merge_twin(kwargs, spec) for spec in specs}
            for name in FILE_FIELDS:
                if fields.get(name) is not None:
                    fields[name] = _file_base64(fields[name], name)
            return command(**kwargs, request_values=fields)

        helps = {**FILE_FIELDS, **(descriptions or {})}
        params = [*(p for p in own if p.default is inspect.Parameter.empty),
                  *(p for s in specs for p in _options(s, helps.get(s.name))),
                  *(p for p in own if p.default is not inspect.Parameter.empty)]
        wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        return wrapper  # type: ignore[return-value]

    return decorate


def request_from_options(options: Mapping[str, Any], base: Mapping[str, Any] | None = None, *,
                         schema: type[GenerateRequest] = GenerateRequest,
                         missing_prompt: str = "give --prompt") -> GenerateRequest:
    """Validate the options given (over ``base``, e.g. a PNG's recipe) into a request; before any torch import.

    A prompt option given once is a string, given several times a list (a batch); options left unset do
    not override ``base``. Raises a usage error (``missing_prompt``) when there is no prompt at all, and
    :class:`~sdmaker.errors.InvalidRequestError` (naming the field and its limits) for a bad value.
    """
    data: dict[str, Any] = dict(base or {})
    for key, value in options.items():
        if value is None or (isinstance(value, list) and not value):
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        data[key] = value
    if "prompt" not in data:
        raise typer.BadParameter(missing_prompt, param_hint="--prompt")
    request: GenerateRequest = parse_request(data, cls=schema)
    return request
