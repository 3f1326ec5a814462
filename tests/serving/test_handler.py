"""The request handler: inference.py discovery and hooks, codecs, the default diffusion handler, the seed's script."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdmaker.engine import read_recipe
from sdmaker.errors import InvalidRequestError, UnsupportedFormatError
from sdmaker.schema import GenerateRequest
from sdmaker.serving import HandlerService, SdModel, WorkerConfig, load_user_module, request_from_payload
from sdmaker.serving._protocol import module_name, trusts_validation
from sdmaker.serving.container._codecs import decode, encode, encode_json, resolve_accept, to_text
from sdmaker.serving.daemon._invoke_api import validate_default_body

FIXTURES = Path(__file__).parent / "fixtures"
SEED_PROMPTS = ["A bird is flying in space", "Photos of horseback riding under the sea"]


def _load(model_dir: Path, **kwargs: object) -> HandlerService:
    handler = HandlerService(model_dir, device="cpu", **kwargs)  # type: ignore[arg-type]
    handler.load()
    return handler


def _call(handler: HandlerService, body: object, *, content_type: str | None = "application/json",
          accept: str | None = None, **headers: str):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if content_type is not None:
        hdrs["content-type"] = content_type
    if accept is not None:
        hdrs["accept"] = accept
    return handler.handle(raw, hdrs)


def _model_with_code(tmp_path: Path, base: Path, fixture: str | None, defaults: dict | None = None) -> Path:
    """A copy of ``base`` (a tiny SD folder) with ``fixture``'s code/ and optional sdmaker.json defaults."""
    out = tmp_path / (fixture or "default")
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("code"))
    if fixture:
        shutil.copytree(FIXTURES / fixture / "code", out / "code")
    if defaults:
        (out / "sdmaker.json").write_text(json.dumps({"name": "tiny", "defaults": defaults}))
    return out


# --- finding inference.py and binding hooks --------------------------------------------------------


def test_module_name_follows_sagemaker_program() -> None:
    assert module_name(None) == "inference"
    assert module_name("") == "inference"  # the SDK sends "" when there is no entry_point
    assert module_name("serve_sd.py") == "serve_sd"
    assert module_name("serve_sd") == "serve_sd"


def test_sagemaker_program_picks_the_module() -> None:
    custom = _load(FIXTURES / "custom_program", program="serve_sd.py")
    assert _call(custom, {}).body == b"program=custom"
    default = _load(FIXTURES / "custom_program", program="")
    assert _call(default, {}).body == b"program=default-inference"


def test_no_inference_script_means_all_defaults(tmp_path: Path) -> None:
    assert load_user_module(tmp_path, None).defined == []
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "other.py").write_text("def model_fn(d):\n    return 1\n")
    assert load_user_module(tmp_path, None).defined == []


def test_every_hook_without_context() -> None:
    handler = _load(FIXTURES / "all_hooks")
    assert handler.hooks.defined == ["model_fn", "input_fn", "predict_fn", "output_fn"]
    first = json.loads(_call(handler, {"a": 1}).body)
    second = _call(handler, {"a": 2})
    assert second.status == 200 and second.content_type == "application/json"
    out = json.loads(second.body)
    # model_fn ran once at load, with the model dir; JSON bodies reach input_fn as str; sibling module import works.
    assert out["loads"] == first["loads"] == 1
    assert out["model_dir"] == str((FIXTURES / "all_hooks").resolve())
    assert out["echo"] == {"a": 2, "input_type": "str"} and out["tag"] == "from-helper"
    assert out["accept"] == "application/json"  # missing Accept -> JSON
    plain = _call(handler, {"b": 3}, accept="text/plain")
    assert plain.content_type == "text/plain" and plain.body == b'plain:{"b": 3, "input_type": "str"}'
    raw = json.loads(_call(handler, b"\x00\x01\x02", content_type="application/octet-stream").body)
    assert raw["echo"] == {"raw_type": "bytes", "content_type": "application/octet-stream", "size": 3}


def test_every_hook_with_context_and_custom_attributes_round_trip() -> None:
    handler = _load(FIXTURES / "all_hooks_context")
    reply = _call(handler, {"x": 1}, X_Amzn_SageMaker_Custom_Attributes="trace=abc;v=2")
    body = json.loads(reply.body)
    assert body["custom"] == "trace=abc;v=2"
    assert reply.headers["X-Amzn-SageMaker-Custom-Attributes"] == "echo=trace=abc;v=2"
    assert body["gpu_id"] == -1 and body["model_dir"] == str((FIXTURES / "all_hooks_context").resolve())
    assert "X-Amzn-SageMaker-Custom-Attributes" not in _call(handler, {"x": 2}).headers  # per-request context


def test_transform_fn_alone() -> None:
    handler = _load(FIXTURES / "transform_only")
    reply = _call(handler, {"q": "hi"}, accept="*/*")
    assert reply.body == b'the-model|application/json|application/json|{"Q": "HI"}'


def test_transform_fn_with_other_hooks_is_the_toolkit_value_error() -> None:
    with pytest.raises(ValueError) as info:
        _load(FIXTURES / "transform_conflict")
    assert str(info.value) == ("Cannot use transform_fn implementation in conjunction with input_fn, predict_fn, "
                               "and/or output_fn implementation")


def test_wrong_arity_is_the_toolkit_type_error() -> None:
    with pytest.raises(TypeError) as info:
        _load(FIXTURES / "bad_arity")
    assert str(info.value) == "predict_fn definition takes 2 or 3 arguments but 1 were given."


def test_model_fn_error_propagates_unchanged() -> None:
    with pytest.raises(RuntimeError, match="weights are corrupt: unet shard 3 of 4 is missing"):
        _load(FIXTURES / "model_fn_raises")


def test_handler_exception_is_hf_400_and_the_handler_keeps_serving() -> None:
    handler = _load(FIXTURES / "all_hooks")
    reply = _call(handler, {"boom": True})
    assert reply.status == 400 and reply.content_type == "application/json"
    assert reply.body.endswith(b"}\n") and b"\\u0027boom\\u0027" in reply.body  # MMS/Gson escaping
    assert json.loads(reply.body) == {"code": 400, "type": "InternalServerException",
                                      "message": "predict exploded: 'boom' was requested"}
    assert _call(handler, {"ok": 1}).status == 200


def test_sys_exit_in_predict_is_answered_and_survived() -> None:
    handler = _load(FIXTURES / "exit_in_predict")
    reply = _call(handler, {"exit": True})
    assert reply.status == 400 and "SystemExit(7)" in json.loads(reply.body)["message"]
    assert json.loads(_call(handler, {}).body) == {"ok": True}


# --- codecs --------------------------------------------------------------------------------------


def test_decoders() -> None:
    assert decode('{"a": [1, 2]}', "application/json") == {"a": [1, 2]}
    assert decode("inputs\nhello\nworld\n", "text/csv") == {"inputs": ["hello", "world"]}
    assert decode("question,context\nq1,c1\n", "text/csv") == {"inputs": [{"question": "q1", "context": "c1"}]}
    buf = io.BytesIO()
    np.save(buf, np.arange(3))
    assert decode(buf.getvalue(), "application/x-npy").tolist() == [0, 1, 2]
    png = io.BytesIO()
    Image.new("L", (4, 3)).save(png, format="PNG")
    image = decode(png.getvalue(), "image/png")["inputs"]
    assert image.size == (4, 3) and image.mode == "RGB"
    assert decode(b"RIFF", "audio/wave") == {"inputs": b"RIFF"}
    with pytest.raises(InvalidRequestError, match="CSV with Header columns"):
        decode("a,b\n1,2\n", "text/csv")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        decode("{nope", "application/json")


def test_unsupported_types_use_the_toolkit_wording() -> None:
    for content_type in (None, "application/octet-stream", "text/plain"):
        with pytest.raises(UnsupportedFormatError, match=f"Content type {content_type} is not supported"):
            decode(b"x", content_type)
    with pytest.raises(UnsupportedFormatError, match="Please implement input_fn"):
        encode({"a": 1}, "application/xml")


def test_charset_parameter_leniency() -> None:
    """Documented deviation: ``application/json; charset=utf-8`` decodes as JSON (the toolkit answers 400);
    any other charset is refused with a 400, as the daemon refuses it."""
    text = to_text('{"p": "café"}'.encode(), "application/json; charset=utf-8")
    assert text == '{"p": "café"}'
    assert decode(text, "application/json; charset=utf-8") == {"p": "café"}
    assert to_text(b"\x00raw", "application/octet-stream") == b"\x00raw"  # other bodies stay bytes
    with pytest.raises(InvalidRequestError, match="not valid UTF-8"):
        to_text(b"\xff\xfe", "application/json")
    with pytest.raises(InvalidRequestError, match="charset 'latin-1' is not supported"):
        to_text('{"p": "café"}'.encode("latin-1"), "application/json; charset=latin-1")


def test_encoders() -> None:
    image = Image.new("RGB", (2, 2), (255, 0, 0))
    out = json.loads(encode({"n": np.int64(3), "f": np.float32(0.5), "arr": np.arange(2), "img": image},
                            "application/json"))
    assert out["n"] == 3 and out["f"] == 0.5 and out["arr"] == [0, 1]
    assert Image.open(io.BytesIO(base64.b64decode(out["img"]))).format == "PNG"
    assert encode_json({"ä": 1}) == '{"ä":1}'  # compact, non-ASCII kept
    assert encode([{"a": 1, "b": 2}], "text/csv").splitlines() == ["a,b", "1,2"]
    assert Image.open(io.BytesIO(encode(image, "image/jpeg"))).format == "JPEG"
    assert Image.open(io.BytesIO(encode(image, "image/x-image"))).format == "PNG"
    assert np.load(io.BytesIO(encode(np.ones(2), "application/x-npy"))).tolist() == [1.0, 1.0]
    assert resolve_accept(None) == resolve_accept("*/*") == "application/json"
    assert resolve_accept("image/png") == "image/png"


# --- request shapes of the default handler ---------------------------------------------------------


def test_request_shapes() -> None:
    seed = request_from_payload({"prompt": SEED_PROMPTS, "height": 512, "width": 512, "num_images_per_prompt": 1})
    assert seed.prompts == SEED_PROMPTS and seed.height == 512
    hf = request_from_payload({"inputs": "a cat", "parameters": {"num_inference_steps": 3, "negative_prompt": "x"}})
    assert hf.prompt == "a cat" and hf.num_inference_steps == 3 and hf.negative_prompt == "x"
    full = request_from_payload({"prompt": "p", "seed": 4, "scheduler": "euler", "format": "png", "quality": 80})
    assert (full.seed, full.scheduler, full.format) == (4, "euler", "png")
    for body, field in (({"prompt": "p", "heigth": 64}, "heigth"), ({"prompt": "p", "height": "tall"}, "height"),
                        ({"inputs": "p", "parameters": [1]}, "parameters"), ({"inputs": "p", "prompt": "q"}, "inputs"),
                        ({"height": 64}, "prompt"), ({"prompt": 3}, "prompt")):
        with pytest.raises(InvalidRequestError) as info:
            request_from_payload(body)
        assert info.value.field == field, body
    with pytest.raises(InvalidRequestError, match="JSON object"):
        request_from_payload(["a cat"])


# --- the default handler on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def default_handler(sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> HandlerService:
    model = _model_with_code(tmp_path_factory.mktemp("default"), sd1_dir, None,
                             defaults={"height": 64, "width": 64, "num_inference_steps": 2,
                                       "guidance_scale": 1.0})
    return _load(model)


def _b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_default_handler_seed_json(default_handler: HandlerService) -> None:
    reply = _call(default_handler, {"prompt": SEED_PROMPTS, "num_images_per_prompt": 1, "seed": 11})
    assert reply.status == 200 and reply.content_type == "application/json"
    body = json.loads(reply.body)
    images = [_b64_image(t) for t in body["generated_images"]]
    assert [(im.format, im.size) for im in images] == [("JPEG", (64, 64))] * 2  # sdmaker.json defaults applied
    assert body["seeds"] == [11, 12] and body["format"] == "jpeg" and body["model"] == "tiny"
    assert reply.headers["X-Sdmaker-Seeds"] == "11,12"


def test_default_handler_hf_shape_and_raw_png(default_handler: HandlerService) -> None:
    reply = _call(default_handler, {"inputs": "a red cube", "parameters": {"seed": 3, "guidance_scale": 0.5}},
                  accept="image/png")
    assert reply.status == 200 and reply.content_type == "image/png"
    recipe = read_recipe(reply.body)  # raw PNG bytes carrying sdmaker's recipe
    assert recipe["request"]["prompt"] == "a red cube" and recipe["request"]["seed"] == 3
    assert recipe["request"]["guidance_scale"] == 0.5 and recipe["request"]["format"] == "png"
    jpeg = _call(default_handler, {"prompt": "x"}, accept="image/jpeg")
    assert jpeg.content_type == "image/jpeg" and Image.open(io.BytesIO(jpeg.body)).format == "JPEG"


def test_default_handler_validates_before_generating(default_handler: HandlerService) -> None:
    model = default_handler.model
    assert isinstance(model, SdModel)
    calls: list[object] = []
    original = model.runner
    model.runner = lambda loaded, request: calls.append(request)  # type: ignore[assignment]
    try:
        cases = [
            ({"prompt": ["a", "b"]}, "image/png", "num_images_per_prompt"),
            ({"prompt": "a", "num_images_per_prompt": 2}, "image/jpeg", "num_images_per_prompt"),
            ({"prompt": "a", "height": "tall"}, None, "height"),
            ({"prompt": "a", "height": 65}, None, "height"),
            ({"prompt": "a", "num_inference_steps": 2.5}, None, "num_inference_steps"),
            ({"prompt": "a", "colour": "red"}, None, "colour"),
            ({"prompt": "a"}, "text/csv", "Accept"),
        ]
        for body, accept, field in cases:
            reply = _call(default_handler, body, accept=accept)
            err = json.loads(reply.body)
            assert reply.status == 400 and err["type"] == "InternalServerException", body
            assert err["field"] == field, (body, err)
            if err["error"] == "InvalidRequestError":  # UnsupportedFormatError keeps the toolkit's wording
                assert field in err["message"], (body, err)
        malformed = json.loads(_call(default_handler, b'{"prompt": "a",').body)
        assert malformed["error"] == "InvalidRequestError" and "not valid JSON" in malformed["message"]
        not_object = json.loads(_call(default_handler, ["a cat"]).body)
        assert "must be a JSON object" in not_object["message"]
        assert calls == []  # nothing reached generation
    finally:
        model.runner = original


def test_daemon_validation_is_trusted_only_from_the_spawning_daemon(default_handler: HandlerService) -> None:
    """One validation on the hot path: a worker the daemon started takes the daemon's canonical body as is;
    any other call (``sdmaker serve``, a direct POST, a forged header) is validated by the worker."""
    model = default_handler.model
    assert isinstance(model, SdModel)
    calls: list[GenerateRequest] = []

    def record(_loaded: object, request: GenerateRequest) -> None:
        calls.append(request)
        raise RuntimeError("recorded")

    original = model.runner
    model.runner = record  # type: ignore[assignment]
    bad = {"prompt": "a", "height": 65}
    forged = {"x_sdmaker_validated": "1"}
    try:
        assert _call(default_handler, bad, **forged).status == 400 and calls == []  # not trusted: validated
        daemon = WorkerConfig(model_dir=default_handler.model_dir, port=0, trust_daemon_validation=True)
        default_handler.validated_by = lambda headers: trusts_validation(daemon, headers)
        assert _call(default_handler, bad).status == 400 and calls == []  # trusted, but no header: validated
        payload = {"inputs": "a fox", "parameters": {"num_inference_steps": 3, "seed": 7}}
        canonical = validate_default_body(json.dumps(payload).encode(), "application/json")
        assert canonical is not None and json.loads(canonical) == {"prompt": "a fox", "num_inference_steps": 3,
                                                                   "seed": 7}
        _call(default_handler, canonical, **forged)
        assert [r.model_dump() for r in calls] == [request_from_payload(payload).model_dump()]
    finally:
        model.runner = original
        default_handler.validated_by = None


def test_the_daemon_refuses_what_the_default_handler_cannot_take() -> None:
    """Issue 11: a body the default handler would refuse is a 400 at the daemon, never a 424 from a worker."""
    ok = json.dumps({"prompt": "a", "height": 64, "width": 64}).encode()
    for content_type in (None, "", "text/plain", "image/png", "application/x-www-form-urlencoded",
                         "application/octet-stream", "application/x-npy", "audio/x-flac"):
        with pytest.raises(UnsupportedFormatError, match="is not supported by this endpoint's default handler"):
            validate_default_body(ok, content_type)
    for charset in ("utf-16", "utf-32"):
        with pytest.raises(InvalidRequestError, match=f"charset '{charset}' is not supported"):
            validate_default_body(json.dumps({"prompt": "a"}).encode(charset), f"application/json; charset={charset}")
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        validate_default_body(b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json")
    with pytest.raises(InvalidRequestError, match="correct CSV"):
        validate_default_body(b"a,b\n1,2", "text/csv")
    # the toolkit's CSV form (an inputs column) is a request, forwarded as canonical JSON
    assert json.loads(validate_default_body(b"inputs\na fox\n", "text/csv")) == {"prompt": ["a fox"]}
    assert json.loads(validate_default_body(ok, "application/json; charset=utf-8")) == json.loads(ok)


def test_runner_is_the_single_generation_call_site(default_handler: HandlerService) -> None:
    """The batching helper swaps ``SdModel.runner``; every default-handler generation goes through it."""
    model = default_handler.model
    seen: list[object] = []
    original = model.runner

    def spy(loaded, request):  # type: ignore[no-untyped-def]
        seen.append(request)
        return original(loaded, request)

    model.runner = spy
    try:
        assert _call(default_handler, {"prompt": "x", "seed": 1}).status == 200
    finally:
        model.runner = original
    assert len(seen) == 1 and seen[0].prompt == "x"


# --- inference.py written like the seed's --------------------------------------------------------------


@pytest.mark.slow
def test_seed_style_inference_py_runs_unchanged(sd1_dir: Path, tmp_path: Path) -> None:
    """The seed's model_fn (fp16 pipeline moved to "cpu") and predict_fn, unchanged: torch 2.13 runs fp16 on
    CPU (slowly; sdmaker logs a warning and keeps the user's dtype)."""
    handler = _load(_model_with_code(tmp_path, sd1_dir, "seed_inference"))
    assert str(handler.model.dtype) == "torch.float16"
    reply = _call(handler, {"prompt": SEED_PROMPTS, "height": 64, "width": 64, "num_inference_steps": 2,
                            "num_images_per_prompt": 1})
    assert reply.status == 200, reply.body
    images = [_b64_image(t) for t in json.loads(reply.body)["generated_images"]]
    assert [(im.format, im.size) for im in images] == [("JPEG", (64, 64))] * 2


def test_predict_fn_alone_gets_a_pipeline_like_default_model(sd1_dir: Path, tmp_path: Path) -> None:
    handler = _load(_model_with_code(tmp_path, sd1_dir, "predict_only"))
    reply = _call(handler, {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 2})
    assert reply.status == 200, reply.body
    [text] = json.loads(reply.body)["generated_images"]
    assert _b64_image(text).size == (64, 64)


@pytest.mark.slow
def test_model_fn_alone_keeps_the_default_request_handling(sd1_dir: Path, tmp_path: Path) -> None:
    handler = _load(_model_with_code(tmp_path, sd1_dir, "model_fn_only"))
    reply = _call(handler, {"inputs": "a cat", "parameters": {"height": 64, "width": 64, "num_inference_steps": 2,
                                                               "seed": 9}})
    assert reply.status == 200, reply.body
    body = json.loads(reply.body)
    assert body["seeds"] == [9] and _b64_image(body["generated_images"][0]).size == (64, 64)
