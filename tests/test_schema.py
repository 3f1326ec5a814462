"""The shared request schema: defaults, resolution, and an error naming the field for every bad value."""

from __future__ import annotations

import math

import pytest

from sdmaker.errors import InvalidRequestError, excerpt
from sdmaker.schema import (
    LIMITS,
    SEED_DEFAULTS,
    GenerateRequest,
    ResolvedRequest,
    parse_request,
    request_fields,
    request_from_body,
    request_from_payload,
)


def test_defaults_equal_the_seed() -> None:
    resolved = GenerateRequest(prompt="a cat").resolve(seed=1)
    assert (resolved.height, resolved.width, resolved.num_inference_steps) == (512, 512, 50)
    assert resolved.guidance_scale == 7.5
    assert resolved.num_images_per_prompt == 1
    assert resolved.format == "jpeg"
    assert SEED_DEFAULTS["height"] == 512


def test_model_defaults_fill_only_unset_fields() -> None:
    req = GenerateRequest(prompt="a cat", width=128)
    resolved = req.resolve({"height": 64, "width": 64, "num_inference_steps": 20, "scheduler": "dpmpp_2m"}, seed=3)
    assert (resolved.height, resolved.width, resolved.num_inference_steps) == (64, 128, 20)
    assert resolved.scheduler == "dpmpp_2m"
    assert resolved.seed == 3


def test_random_seed_is_chosen_and_reported() -> None:
    resolved = GenerateRequest(prompt="x").resolve()
    assert isinstance(resolved, ResolvedRequest)
    assert 0 <= resolved.seed < 2**32


def test_image_seeds_are_prompt_major_and_derived() -> None:
    resolved = GenerateRequest(prompt=["a", "b"], num_images_per_prompt=3, seed=10).resolve()
    assert resolved.image_seeds() == [10, 11, 12, 13, 14, 15]


BAD = [
    ({"prompt": "x", "height": 65}, "height", "multiple of 8"),
    ({"prompt": "x", "width": 8}, "width", "64..2048"),
    ({"prompt": "x", "height": 4096}, "height", "64..2048"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "1..500"),
    ({"prompt": "x", "num_inference_steps": 10**6}, "num_inference_steps", "1..500"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "0.0..50.0"),
    ({"prompt": "x", "guidance_scale": math.nan}, "guidance_scale", None),
    ({"prompt": "x", "guidance_scale": math.inf}, "guidance_scale", None),
    ({"prompt": "x", "num_images_per_prompt": 0}, "num_images_per_prompt", "1..16"),
    ({"prompt": "x", "seed": -1}, "seed", "0.."),
    ({"prompt": "x", "scheduler": "karras"}, "scheduler", "one of"),
    ({"prompt": "x", "format": "gif"}, "format", "one of"),
    ({"prompt": "x", "quality": 0}, "quality", "1..100"),
    ({"prompt": 5}, "prompt", "a string or a list"),
    ({"prompt": []}, "prompt", None),
    ({"prompt": ["a", 3]}, "prompt", None),
    ({"prompt": "x" * (LIMITS["prompt_chars_max"] + 1)}, "prompt", None),
    ({"prompt": ["a"] * (LIMITS["prompts_max"] + 1)}, "prompt", None),
    ({}, "prompt", None),
    ({"prompt": "x", "height": "tall"}, "height", None),
    ({"prompt": "x", "colour": "red"}, "colour", None),
]


@pytest.mark.parametrize(("data", "field", "allowed"), BAD)
def test_every_rejection_names_the_field(data: dict, field: str, allowed: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(data)
    err = info.value
    assert err.field == field
    assert field in err.message
    if allowed:
        assert allowed in err.message
    # the JSON form must be serialisable for HTTP bodies
    import json

    json.dumps(err.to_dict())


def test_cross_field_rules() -> None:
    with pytest.raises(InvalidRequestError, match="negative_prompt has 1 entries but prompt has 2"):
        parse_request({"prompt": ["a", "b"], "negative_prompt": ["c"]})
    with pytest.raises(InvalidRequestError, match="images"):
        parse_request({"prompt": ["a"] * 4, "num_images_per_prompt": 16})
    with pytest.raises(InvalidRequestError, match="pixels"):
        parse_request({"prompt": "a", "height": 2048, "width": 2048})


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_request(["a prompt"])


# --- strict numbers (issue 11: "64", true, -0.0 and 1e-400 were accepted as integers) ----------------

INT_FIELDS = [spec.name for spec in request_fields() if spec.type is int]


def test_the_integer_fields_are_the_expected_ones() -> None:
    assert set(INT_FIELDS) == {"height", "width", "num_inference_steps", "num_images_per_prompt", "seed",
                               "deep_cache_interval", "quality", "preview_every"}


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("raw", ['"64"', "true", "-0.0", "1e-400", "64.0", "[64]"])
def test_integer_fields_take_json_integers_only(field: str, raw: str) -> None:
    body = '{"prompt": "x", "' + field + '": ' + raw + "}"
    with pytest.raises(InvalidRequestError) as info:
        request_from_body(body.encode(), "application/json")
    err = info.value
    assert err.field == field
    assert err.message.startswith(f"{field}=")
    assert "must be an integer, got" in err.message
    spec = next(s for s in request_fields() if s.name == field)
    assert f"(allowed: {spec.allowed})" in err.message  # the limit is named


def test_a_json_integer_is_still_accepted() -> None:
    req = request_from_body(b'{"prompt": "x", "height": 64, "seed": 0, "quality": 100, "deep_cache_interval": 2}')
    assert (req.height, req.seed, req.quality, req.deep_cache_interval) == (64, 0, 100, 2)


@pytest.mark.parametrize("raw", ['"7.5"', "true", "null"])
def test_guidance_scale_takes_numbers_only(raw: str) -> None:
    body = ('{"prompt": "x", "guidance_scale": ' + raw + "}").encode()
    if raw == "null":
        assert request_from_body(body).guidance_scale is None
        return
    with pytest.raises(InvalidRequestError, match="guidance_scale=.*must be a number"):
        request_from_body(body)


def test_guidance_scale_accepts_an_integer() -> None:
    assert request_from_body(b'{"prompt": "x", "guidance_scale": 7}').guidance_scale == 7.0


# --- error bodies quote a few hundred bytes at most (issue 11: a 6 MiB prompt gave a 12.6 MB error) ---


def _wire_size(err: InvalidRequestError) -> int:
    import json

    return len(json.dumps(err.to_dict(), ensure_ascii=False).encode("utf-8"))


@pytest.mark.parametrize("data", [
    {"prompt": "x" * (6 * 1024 * 1024)},
    {"prompt": ["y" * (6 * 1024 * 1024)]},
    {"prompt": "x", "scheduler": "s" * (6 * 1024 * 1024)},
    {"prompt": "x", "k" * (6 * 1024 * 1024): 1},
    {"prompt": "x", "seed": "9" * (6 * 1024 * 1024)},
    {"prompt": "x", "height": list(range(100_000))},
    {"prompt": "x", **{f"unknown{i}": i for i in range(100_000)}},
    {"inputs": "x", "parameters": {"q" * 100_000: 1}, "q" * 100_000: 2},
])
def test_errors_quote_only_an_excerpt_of_the_input(data: dict) -> None:
    with pytest.raises(InvalidRequestError) as info:
        request_from_payload(data)
    err = info.value
    assert len(err.message) < 1000, err.message[:2000]
    assert _wire_size(err) < 4000
    assert len(err.fields["errors"]) <= 11


def test_the_excerpt_keeps_the_start_of_the_value() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": "x", "scheduler": "karras" + "z" * 10_000})
    assert "'karras" in info.value.message and "one of ddim" in info.value.message


def test_excerpt_is_bounded_and_utf8_safe() -> None:
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for value in ("a" * 10**6, deep, {"k": "\ud800" * 10}, b"\xff" * 10**5, 10**50):
        text = excerpt(value)
        assert len(text) <= 203
        text.encode("utf-8")


# --- lone surrogates, deep nesting, charsets (issue 11: these came back as 424 or 500) ----------------


@pytest.mark.parametrize("body", [
    b'{"prompt": "\\ud800"}',
    b'{"prompt": ["ok", "a\\udfffb"]}',
    b'{"prompt": "x", "negative_prompt": "\\udbff"}',
    b'{"inputs": "\\ud800", "parameters": {"seed": 1}}',
])
def test_a_lone_surrogate_is_a_validation_error(body: bytes) -> None:
    import json

    with pytest.raises(InvalidRequestError, match="lone surrogate") as info:
        request_from_body(body, "application/json")
    err = info.value
    assert err.field in ("prompt", "negative_prompt")
    json.dumps(err.to_dict(), ensure_ascii=False).encode("utf-8")  # renders as a response body (no 500)
    err.message.encode("utf-8")


def test_a_surrogate_pair_is_fine() -> None:
    assert request_from_body(b'{"prompt": "\\ud83d\\ude00"}').prompt == "\U0001f600"


def test_an_unknown_field_named_with_a_surrogate_renders() -> None:
    import json

    with pytest.raises(InvalidRequestError) as info:
        request_from_body(b'{"prompt": "x", "\\ud800": 1}')
    json.dumps(info.value.to_dict(), ensure_ascii=False).encode("utf-8")
    info.value.message.encode("utf-8")


@pytest.mark.parametrize("depth", [1000, 5000, 100_000])
@pytest.mark.parametrize("shape", ["array", "in_prompt", "in_parameters", "object"])
def test_deep_nesting_is_a_validation_error(depth: int, shape: str) -> None:
    nested = "[" * depth + "]" * depth
    body = {"array": nested, "in_prompt": '{"prompt": ' + nested + "}",
            "in_parameters": '{"inputs": "x", "parameters": {"seed": ' + nested + "}}",
            "object": '{"a":' * depth + "1" + "}" * depth}[shape]
    with pytest.raises(InvalidRequestError) as info:
        request_from_body(body.encode(), "application/json")
    assert len(info.value.message) < 1000


def test_moderate_nesting_parses_then_fails_validation_cleanly() -> None:
    nested = "[" * 400 + "]" * 400
    with pytest.raises(InvalidRequestError) as info:
        request_from_body(('{"prompt": "x", "seed": ' + nested + "}").encode())
    assert info.value.field == "seed"


def test_the_body_is_utf8_and_other_charsets_are_refused() -> None:
    """UTF-8 (declared or not) is taken; any other declared charset is a 400 naming Content-Type (issue 11).

    The daemon and the worker both decode through :func:`body_text`, so a UTF-16 body can never pass one and
    fail the other (it used to pass the daemon and come back as a 424 from the worker).
    """
    body = '{"prompt": "caf\u00e9"}'
    assert request_from_body(body.encode("utf-8"), "application/json").prompt == "caf\u00e9"
    assert request_from_body(body.encode("utf-8"), "application/json; charset=UTF-8").prompt == "caf\u00e9"
    for charset in ("utf-16", "utf-32", "latin-1", "klingon"):
        with pytest.raises(InvalidRequestError, match="charset .* is not supported") as info:
            request_from_body(body.encode("utf-8"), f"application/json; charset={charset}")
        assert info.value.field == "Content-Type"
    with pytest.raises(InvalidRequestError, match="not valid UTF-8 text") as info:  # UTF-16 labelled plain JSON
        request_from_body(body.encode("utf-16"), "application/json")
    assert info.value.field == "Body"
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        request_from_body(b'{"prompt": ')


# --- one description of the fields, for the client and the CLI -----------------------------------------


def test_request_fields_describe_every_schema_field() -> None:
    specs = {s.name: s for s in request_fields()}
    assert list(specs) == list(GenerateRequest.model_fields)
    assert specs["prompt"].required and specs["prompt"].multiple and specs["prompt"].type is str
    height = specs["height"]
    assert (height.type, height.default, height.minimum, height.maximum, height.multiple_of) == (
        int, None, LIMITS["size_min"], LIMITS["size_max"], 8)
    assert height.option == "--height" and height.allowed == "64..2048, multiple of 8"
    assert specs["deep_cache_interval"].maximum == LIMITS["deep_cache_max"]
    assert specs["deep_cache_interval"].option == "--deep-cache-interval"
    assert specs["scheduler"].choices is not None and "euler_a" in specs["scheduler"].choices
    assert specs["format"].default == "jpeg" and specs["quality"].default == 90
    assert specs["guidance_scale"].type is float
    assert all(s.description for s in specs.values())


def test_request_from_payload_lives_in_the_schema() -> None:
    from sdmaker import serving

    assert serving.request_from_payload is request_from_payload  # the handler's is the schema's
    hf = request_from_payload({"inputs": "a cat", "parameters": {"deep_cache_interval": 2}})
    assert (hf.prompt, hf.deep_cache_interval) == ("a cat", 2)
