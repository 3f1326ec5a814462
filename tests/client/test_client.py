"""``sdmaker.client``: Client and Predictor against the shared daemon, error mapping, and no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdmaker.client import Client, Predictor
from sdmaker.errors import (
    EndpointExistsError,
    EndpointNotFoundError,
    InvalidRequestError,
    InvocationFailedError,
    PayloadTooLargeError,
    ServingError,
    WorkerStartError,
)


def test_import_does_not_load_torch() -> None:
    code = "import sys, sdmaker.client; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.fixture(scope="module")
def client(daemon):  # type: ignore[no-untyped-def]
    with Client(daemon.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(client: Client, sd1_dir: Path) -> str:
    info = client.create_endpoint("cl-tiny", model=str(sd1_dir), workers=1, timeout_s=120)
    assert info["status"] == "InService"
    return "cl-tiny"


def test_generate_describe_logs(client: Client, tiny: str, tmp_path: Path) -> None:
    gen = client.generate(tiny, prompt=["a cat", "a dog"], height=64, width=64, num_inference_steps=2, seed=7)
    assert len(gen.images) == 2
    paths = gen.save(tmp_path)
    assert [p.suffix for p in paths] == [".jpg", ".jpg"]
    assert Image.open(paths[0]).size == (64, 64)
    assert gen.pil(1).size == (64, 64)

    info = client.describe_endpoint(tiny)
    assert info["status"] == "InService" and info["timeout_s"] == 120
    assert info["model_digest"] and info["invocations"] >= 1 and info["latency_p50_s"] > 0
    assert [w["state"] for w in info["workers"]] == ["Ready"]
    assert tiny in [e["name"] for e in client.list_endpoints()]
    text, offset = client.logs(tiny)
    assert "starting worker 0" in text and offset > 0
    assert client.logs(tiny, offset=offset) == ("", offset)
    assert 'sdmaker_images_generated_total{endpoint="cl-tiny"}' in client.metrics()


def test_errors_map_to_sdmaker_classes(client: Client, tiny: str, sd1_dir: Path) -> None:
    with pytest.raises(InvalidRequestError) as info:  # checked before anything is sent
        client.generate(tiny, prompt="x", height=65)
    assert info.value.field == "height"
    with pytest.raises(InvalidRequestError, match="unknown field"):  # checked by the daemon
        client.invoke(tiny, {"prompt": "x", "steps": 3})
    with pytest.raises(EndpointNotFoundError):
        client.invoke("cl-missing", {"prompt": "x"})
    with pytest.raises(EndpointNotFoundError):
        client.describe_endpoint("cl-missing")
    with pytest.raises(PayloadTooLargeError):
        client.invoke(tiny, b"x" * (6 * 1024 * 1024 + 10))
    with pytest.raises(EndpointExistsError):
        client.create_endpoint(tiny, model=str(sd1_dir))
    with pytest.raises(ServingError, match="cannot reach the sdmaker daemon"), \
            Client("http://127.0.0.1:9", timeout=2) as nowhere:
        nowhere.list_endpoints()


def test_predictor_and_model_errors(client: Client, scripted_model_dir: Path) -> None:
    client.create_endpoint("cl-echo", model=str(scripted_model_dir))
    predictor = Predictor("cl-echo", client=client)
    assert predictor.predict({"prompt": ["a"], "height": 64})["echo"] == {"prompt": ["a"], "height": 64}
    with pytest.raises(InvocationFailedError) as info:
        predictor.predict({"fail": "broken model code"})
    assert info.value.fields["OriginalStatusCode"] == 400
    assert "broken model code" in info.value.message
    with pytest.raises(InvocationFailedError) as info:  # the model's error echoes 4 MiB: the daemon quotes 1 KiB
        predictor.predict({"fail": "z" * (4 * 1024 * 1024)})
    assert len(info.value.message) < 4096 and len(info.value.fields["OriginalMessage"]) < 2048
    predictor.delete_endpoint()
    with pytest.raises(EndpointNotFoundError):
        client.describe_endpoint("cl-echo")


def test_failed_endpoint_raises_with_the_worker_error(client: Client, scripted_model_dir: Path) -> None:
    with pytest.raises(WorkerStartError, match="out of unicorns"):
        client.create_endpoint("cl-broken", model=str(scripted_model_dir),
                               environment={"SCRIPTED_LOAD_FAIL": "out of unicorns"})
    client.delete_endpoint("cl-broken")


def test_generate_with_deep_cache_interval(client: Client, tiny: str) -> None:
    """A schema field the old hand-written signature lacked reaches the endpoint (issue 18, item 7)."""
    gen = client.generate(tiny, "a cat", height=64, width=64, num_inference_steps=4, deep_cache_interval=2, seed=5)
    assert len(gen.images) == 1 and gen.raw["seeds"] == [5]


@pytest.mark.parametrize(("body", "field"), [
    (b'{"prompt": "x", "height": "64"}', "height"),
    (b'{"prompt": "x", "num_inference_steps": true}', "num_inference_steps"),
    (b'{"prompt": "x", "seed": -0.0}', "seed"),
    (b'{"prompt": "x", "width": 1e-400}', "width"),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", "Body"),
    (b"[" * 1000 + b"]" * 1000, "Body"),
    (b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}', "prompt"),
])
def test_bad_bodies_are_short_validation_errors_at_the_daemon(daemon, tiny: str, body: bytes,  # type: ignore[no-untyped-def]
                                                             field: str) -> None:
    """Issue 11: 400 ValidationError with the code header, never 424/500; the body quotes an excerpt only;
    the keep-alive connection stays usable."""
    import httpx

    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        reply = http.post(f"/endpoints/{tiny}/invocations", content=body, headers={"Content-Type": "application/json"})
        assert reply.status_code == 400, reply.text[:500]
        assert reply.headers["x-amzn-ErrorType"] == "ValidationError"
        assert reply.headers["X-Sdmaker-Error-Code"] == "InvalidRequestError"
        assert len(reply.content) < 2000
        message = reply.json()["message"]
        assert message.startswith(f"{field}=") or (field == "Body" and "not valid JSON" in message), message
        again = http.get("/ping")  # same connection
        assert again.status_code == 200
