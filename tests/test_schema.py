"""The shared request schema: defaults, resolution, and an error naming the field for every bad value."""

from __future__ import annotations

import math

import pytest

from sdmaker.errors import InvalidRequestError
from sdmaker.schema import LIMITS, SEED_DEFAULTS, GenerateRequest, ResolvedRequest, parse_request


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
