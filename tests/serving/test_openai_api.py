"""The OpenAI Images API on the daemon, driven by the stock ``openai`` client (pinned in requirements-dev.txt).

One daemon for the module; its only model is the built-in ``mini``, which the API serves through the managed
endpoint ``sdmaker-mini`` (created by the first request). Requests use 64x64 and 2 steps.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from conftest import DaemonProcess
from PIL import Image

from sdmaker.schema import GenerateRequest

# slow; the first test also waits for the managed endpoint to load mini (minutes on a busy 2-core machine)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

_FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def oa_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("openai-home"), env={
        "HF_HUB_OFFLINE": "1", "SDMAKER_INVOCATION_TIMEOUT": "900", "SDMAKER_STANDBY_WORKERS": "0"}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(oa_daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=oa_daemon.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=900)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generate_matches_invoke_endpoint_for_the_same_seed(client: openai.OpenAI, oa_daemon: DaemonProcess) -> None:
    answer = client.images.generate(model="mini", prompt="a red circle on blue", size="64x64",
                                    extra_body={"seed": 7, **_FAST})
    assert isinstance(answer.created, int) and answer.data is not None and len(answer.data) == 1
    image = answer.data[0]
    assert image.revised_prompt is None and image.url is None
    png = base64.b64decode(image.b64_json or "")
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (64, 64)
    recipe = json.loads(Image.open(io.BytesIO(png)).info["sdmaker"])
    assert recipe["request"]["seed"] == 7 and recipe["request"]["prompt"] == "a red circle on blue"
    assert answer.usage is not None and answer.usage.input_tokens == 5 and answer.usage.output_tokens >= 1
    assert answer.output_format == "png" and answer.size == "64x64"
    # the store model was served through a managed endpoint, visible like any other
    rt = oa_daemon.boto("sagemaker-runtime")
    body = {"prompt": "a red circle on blue", "width": 64, "height": 64, "seed": 7, "format": "png", **_FAST}
    direct = rt.invoke_endpoint(EndpointName="sdmaker-mini", Body=json.dumps(body), ContentType="application/json",
                                Accept="image/png")["Body"].read()
    assert np.array_equal(_pixels(png), _pixels(direct))


def test_hardcoded_model_names_n_url_and_jpeg(client: openai.OpenAI, oa_daemon: DaemonProcess) -> None:
    answer = client.images.generate(model="dall-e-3", prompt="a cat", n=2, size="64x64", response_format="url",
                                    output_format="jpeg", quality="low", extra_body={"seed": 3})
    assert answer.data is not None and len(answer.data) == 2
    for image in answer.data:
        assert image.b64_json is None and image.url is not None
        assert image.url.startswith(oa_daemon.url + "/v1/images/files/")
        got = httpx.get(image.url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        assert got.content.startswith(b"\xff\xd8")
    # the two images differ (seeds 3 and 4) and the URL of a file that never existed is a 404
    a, b = (httpx.get(i.url or "").content for i in answer.data)
    assert a != b
    assert httpx.get(oa_daemon.url + "/v1/images/files/" + "0" * 32 + ".png").status_code == 404


def test_streaming_ends_with_completed_images(client: openai.OpenAI) -> None:
    stream = client.images.generate(model="sdmaker-mini", prompt="a tree", size="64x64", stream=True,
                                    partial_images=2, extra_body={"seed": 11, "num_inference_steps": 4})
    events = list(stream)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(completed) == 1 and events[-1].type == "image_generation.completed"
    final = base64.b64decode(completed[0].b64_json)
    assert Image.open(io.BytesIO(final)).size == (64, 64)
    assert completed[0].usage.total_tokens >= 1 and completed[0].size == "64x64"
    assert len(partial) <= 2
    assert [e.partial_image_index for e in partial] == list(range(len(partial)))
    if "preview" in GenerateRequest.model_fields:  # an engine with previews feeds the partial images
        assert partial, "previews were asked for but no partial image arrived"
        Image.open(io.BytesIO(base64.b64decode(partial[0].b64_json))).load()


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"size": "100x100"}, "size"),
    ({"size": "big"}, "size"),
    ({"n": 0}, "n"),
    ({"output_format": "gif"}, "output_format"),
    ({"quality": "ultra"}, "quality"),
    ({"extra_body": {"guidance_scale": "high"}}, "guidance_scale"),
    ({"extra_body": {"colour": "red"}}, "colour"),
])
def test_bad_input_is_a_bad_request_naming_the_parameter(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="mini", prompt="x", **kwargs)
    assert info.value.status_code == 400
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="no-such-model", prompt="x")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


def test_raw_errors_have_openai_shape(oa_daemon: DaemonProcess) -> None:
    bad_json = httpx.post(oa_daemon.url + "/v1/images/generations", content=b"{", headers={
        "Content-Type": "application/json"})
    assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    unknown_route = httpx.get(oa_daemon.url + "/v1/nothing")
    assert unknown_route.status_code == 404 and unknown_route.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("openai-auth"), env={
        "SDMAKER_REQUIRE_AUTH": "1", "SDMAKER_API_TOKEN": "tok-openai", "SDMAKER_STANDBY_WORKERS": "0"}).start()
    yield d
    d.stop()


def test_off_loopback_auth_is_the_bearer_token(auth_daemon: DaemonProcess) -> None:
    for key in ("wrong", "-"):
        c = openai.OpenAI(base_url=auth_daemon.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            c.images.generate(model="mini", prompt="x")
        assert info.value.status_code == 401
    good = openai.OpenAI(base_url=auth_daemon.url + "/v1", api_key="tok-openai", max_retries=0)
    with pytest.raises(openai.NotFoundError):  # authenticated, then the model is unknown
        good.images.generate(model="no-such-model", prompt="x")
    # the web UI's page loads without credentials (it holds no data); its data routes do not
    assert httpx.get(auth_daemon.url + "/").status_code == 200
    assert httpx.get(auth_daemon.url + "/sdmaker/v1/gallery").status_code == 403
    assert httpx.get(auth_daemon.url + "/sdmaker/v1/gallery",
                     headers={"Authorization": "Bearer tok-openai"}).status_code == 200


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_edits_inpaint_with_an_openai_alpha_mask_and_img2img(client: openai.OpenAI) -> None:
    src = np.full((64, 64, 3), 255, dtype=np.uint8)
    src[20:44, 4:28] = (220, 30, 30)
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:, 32:] = 0  # OpenAI's convention: transparent = edit
    mask = Image.fromarray(np.dstack([np.zeros_like(src), alpha[..., None]]), "RGBA")
    answer = client.images.edit(model="mini", image=("in.png", _png(Image.fromarray(src)), "image/png"),
                                mask=("mask.png", _png(mask), "image/png"), prompt="a yellow star on the right",
                                extra_body={"seed": 5, **_FAST})
    assert answer.data is not None and len(answer.data) == 1 and answer.size == "64x64"
    png = base64.b64decode(answer.data[0].b64_json or "")
    out = _pixels(png)
    assert np.array_equal(out[:, :32], src[:, :32])  # the kept half comes back exactly
    recipe = json.loads(Image.open(io.BytesIO(png)).info["sdmaker"])
    assert recipe["request"]["strength"] == 1.0 and set(recipe["inputs"]) == {"image_sha256", "mask_image_sha256"}
    # no mask, opaque image: image-to-image at the given strength
    again = client.images.edit(model="mini", image=("in.png", _png(Image.fromarray(src)), "image/png"),
                               prompt="a blue circle on the left", extra_body={"seed": 5, "strength": 0.5, **_FAST})
    png = base64.b64decode((again.data or [])[0].b64_json or "")
    recipe = json.loads(Image.open(io.BytesIO(png)).info["sdmaker"])
    assert recipe["request"]["strength"] == 0.5 and set(recipe["inputs"]) == {"image_sha256"}


@pytest.mark.parametrize(("files", "param"), [
    ({"image": ("in.png", b"not an image", "image/png")}, "image"),
    ({"mask": ("m.png", _png(Image.new("L", (64, 64))), "image/png")}, "image"),  # no image
    ({"image": ("in.png", _png(Image.new("RGB", (64, 64))), "image/png"),
      "mask": ("m.png", _png(Image.new("L", (72, 64))), "image/png")}, "mask"),
])
def test_bad_edits_are_bad_requests_naming_the_parameter(oa_daemon: DaemonProcess, files: dict, param: str) -> None:
    got = httpx.post(oa_daemon.url + "/v1/images/edits", files=files, data={"prompt": "x"}, timeout=60)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["param"] == param
