"""``Client.generate(..., loras=...)``: validated here, sent as the schema's JSON, adapters reported back."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from sdmaker.client import Client
from sdmaker.config import load_settings
from sdmaker.errors import InvalidRequestError


def test_generate_sends_loras_and_returns_the_adapters(sdmaker_home: Path) -> None:
    sent: list[dict[str, object]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"generated_images": [base64.b64encode(b"img").decode()],
                                         "adapters": [{"name": "heart", "scale": 0.5, "digest": "ab"}]})

    client = Client("http://127.0.0.1:9", settings=load_settings(), transport=httpx.MockTransport(answer))
    gen = client.generate("ep", "a pink heart", loras=["heart:0.5", {"name": "pink"}])
    assert sent[0]["loras"] == [{"name": "heart", "scale": 0.5}, {"name": "pink", "scale": 1.0}]
    assert gen.raw["adapters"][0]["name"] == "heart"
    with pytest.raises(InvalidRequestError) as info:
        client.generate("ep", "x", loras=[{"name": "heart", "scale": 40}])
    assert info.value.field == "loras[0].scale" and len(sent) == 1  # refused before anything was sent
