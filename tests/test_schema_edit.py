"""The edit fields of the request schema (image, mask_image, strength): 400s naming the field, defaults."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from sdmaker.errors import InvalidRequestError
from sdmaker.schema import parse_request, request_from_payload


def b64(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.mark.parametrize(("fields", "field"), [
    ({"image": base64.b64encode(b"hello, not an image").decode()}, "image"),
    ({"image": "%%% not base64 %%%"}, "image"),
    ({"image": b64((64, 64), "GIF", "P")}, "image"),
    ({"image": b64((64, 64)), "mask_image": base64.b64encode(b"\x89PNG broken").decode()}, "mask_image"),
    ({"mask_image": b64((64, 64))}, "mask_image"),  # a mask without an image
    ({"strength": 0.5}, "strength"),  # strength without an image
    ({"image": b64((64, 64)), "mask_image": b64((72, 64), mode="L")}, "mask_image"),  # sizes differ
    ({"image": b64((64, 64)), "strength": 1.5}, "strength"),
    ({"image": b64((64, 64)), "strength": -0.1}, "strength"),
    ({"image": b64((64, 64)), "strength": 0.05, "num_inference_steps": 10}, "strength"),  # runs no step
    ({"image": b64((2056, 64))}, "image"),  # over the size limit
    ({"image": b64((40, 40))}, "image"),  # too small as the output size, and no width/height given
])
def test_bad_edit_fields_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": "x", **fields})
    assert info.value.field == field
    assert info.value.http_status == 400


def test_size_and_strength_defaults() -> None:
    req = parse_request({"prompt": "x", "image": b64((100, 72))})
    resolved = req.resolve({"width": 64, "height": 64})
    assert (resolved.width, resolved.height) == (96, 72)  # the image's size (multiple of 8) beats the model's
    assert resolved.strength == 0.8
    inpaint = parse_request({"prompt": "x", "image": b64((64, 64)), "mask_image": b64((64, 64), mode="L")}).resolve()
    assert inpaint.strength == 1.0
    sized = parse_request({"prompt": "x", "image": b64((40, 40)), "width": 64, "height": 64}).resolve()
    assert (sized.width, sized.height) == (64, 64)  # given, the image is resized to it
    assert parse_request({"prompt": "x"}).resolve().strength is None


def test_toolkit_payload_and_data_urls_are_accepted() -> None:
    req = request_from_payload({"inputs": "x", "parameters": {"image": "data:image/png;base64," + b64((64, 64)),
                                                               "strength": 0.5}})
    assert req.strength == 0.5 and req.edit_kind == "img2img"
