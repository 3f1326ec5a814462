"""InvokeEndpoint on the daemon through boto3's ``sagemaker-runtime`` client: answers and every error code."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import pytest
from botocore.exceptions import ClientError
from PIL import Image


def _error(info: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, dict]:
    response = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"], response


@pytest.fixture(scope="module")
def tiny_endpoint(daemon, sd1_dir) -> str:  # type: ignore[no-untyped-def]
    """The default handler (no inference.py) on the tiny SD1 model."""
    desc = daemon.deploy("rt-tiny", sd1_dir)
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    return "rt-tiny"


@pytest.fixture(scope="module")
def scripted_endpoint(daemon, scripted_model_dir) -> str:  # type: ignore[no-untyped-def]
    """One worker, no queue, a 3 s invocation budget: for ModelError, timeout and backpressure."""
    desc = daemon.deploy("rt-scripted", scripted_model_dir,
                         env={"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "3", "SDMAKER_MAX_QUEUE": "0"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    return "rt-scripted"


def test_invoke_returns_base64_jpeg_and_sagemaker_headers(daemon, tiny_endpoint) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    response = rt.invoke_endpoint(
        EndpointName=tiny_endpoint, ContentType="application/json", Accept="application/json",
        Body=json.dumps({"prompt": ["a bird", "a horse"], "height": 64, "width": 64, "num_inference_steps": 2}))
    assert response["ContentType"].startswith("application/json")
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["ResponseMetadata"]["RequestId"]
    images = json.loads(response["Body"].read())["generated_images"]
    assert len(images) == 2
    for b64 in images:
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert image.format == "JPEG" and image.size == (64, 64)
    # the daemon counts images from the worker's X-Sdmaker-Seeds header, without parsing the reply
    metrics = httpx.get(f"{daemon.url}/metrics").text
    line = next(x for x in metrics.splitlines()
                if x.startswith(f'sdmaker_images_generated_total{{endpoint="{tiny_endpoint}"}}'))
    assert float(line.split()[-1]) >= 2


@pytest.mark.parametrize(("body", "field"), [
    (b'{"prompt": "a cat", "height": 64,', "not valid JSON"),
    (json.dumps({"prompt": "a cat", "height": "tall"}).encode(), "height="),
    (json.dumps({"prompt": 42}).encode(), "prompt="),
    (json.dumps({"prompt": "a cat", "width": 65}).encode(), "multiple of 8"),
    (json.dumps({"prompt": "a cat", "steps": 3}).encode(), "unknown field"),
    (json.dumps(["a cat"]).encode(), "JSON object"),
])
def test_bad_input_is_a_validation_error(daemon, tiny_endpoint, body: bytes, field: str) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    with pytest.raises(ClientError) as info:
        rt.invoke_endpoint(EndpointName=tiny_endpoint, Body=body, ContentType="application/json")
    code, status, response = _error(info)
    assert (code, status) == ("ValidationError", 400)
    assert field in response["Error"]["Message"]


def test_unknown_endpoint(daemon) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    with pytest.raises(rt.exceptions.ValidationError) as info:
        rt.invoke_endpoint(EndpointName="no-such-endpoint", Body=b"{}", ContentType="application/json")
    assert info.value.response["Error"]["Message"] == "Endpoint no-such-endpoint of account 000000000000 not found."


def test_body_over_6_mib_is_refused_before_the_model(daemon, tiny_endpoint) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    with pytest.raises(ClientError) as info:
        rt.invoke_endpoint(EndpointName=tiny_endpoint, Body=b" " * (6 * 1024 * 1024 + 1),
                           ContentType="application/json")
    code, status, response = _error(info)
    assert (code, status) == ("ValidationError", 413)
    assert "6291456" in response["Error"]["Message"]


def test_model_code_error_is_a_model_error(daemon, scripted_endpoint) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    with pytest.raises(rt.exceptions.ModelError) as info:
        rt.invoke_endpoint(EndpointName=scripted_endpoint, Body=json.dumps({"fail": "no horses today"}),
                           ContentType="application/json")
    response = info.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["OriginalStatusCode"] == 400
    assert "no horses today" in response["OriginalMessage"]
    assert response["Error"]["Message"].startswith("Received client error (400) from primary with message")
    assert response["LogStreamArn"].endswith(":log-group:/aws/sagemaker/Endpoints/rt-scripted")
    # the endpoint keeps serving
    ok = rt.invoke_endpoint(EndpointName=scripted_endpoint, Body=json.dumps({"x": 1}), ContentType="application/json")
    assert json.loads(ok["Body"].read())["echo"] == {"x": 1}


def test_timeout_and_full_queue(daemon, scripted_endpoint) -> None:  # type: ignore[no-untyped-def]
    """A request over the endpoint's 3 s budget gets 424 "timed out"; meanwhile the queue (0) is full -> 503."""
    rt = daemon.boto("sagemaker-runtime")
    outcome: dict[str, object] = {}

    def slow() -> None:
        try:
            rt.invoke_endpoint(EndpointName=scripted_endpoint, Body=json.dumps({"sleep": 8}),
                               ContentType="application/json")
        except ClientError as exc:
            outcome["slow"] = exc.response

    thread = threading.Thread(target=slow)
    thread.start()
    # wait until the slow request holds the only worker, then one more must be refused with 503
    for _ in range(200):
        info = httpx.get(f"{daemon.url}/sdmaker/v1/endpoints/{scripted_endpoint}").json()
        if any(w["state"] == "Busy" for w in info["workers"]):
            break
        threading.Event().wait(0.05)
    reply = httpx.post(f"{daemon.url}/endpoints/{scripted_endpoint}/invocations", content=b"{}",
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 503
    assert reply.headers["x-amzn-ErrorType"] == "ServiceUnavailable"
    assert reply.headers["Retry-After"]
    assert "code" not in reply.json()
    thread.join(timeout=60)
    slow_response = outcome["slow"]
    assert isinstance(slow_response, dict)
    assert slow_response["Error"]["Code"] == "ModelError"
    assert "Your invocation timed out" in slow_response["Error"]["Message"]
    # the busy worker was not killed (it answers /ping): the endpoint serves again once its sleep is over
    for _ in range(400):
        try:
            ok = rt.invoke_endpoint(EndpointName=scripted_endpoint, Body=b"{}", ContentType="application/json")
            break
        except ClientError:
            threading.Event().wait(0.1)
    assert json.loads(ok["Body"].read())["echo"] == {}


def test_custom_attributes_and_request_id(daemon, scripted_endpoint) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    response = rt.invoke_endpoint(EndpointName=scripted_endpoint, Body=b'{"a": 2}', ContentType="application/json",
                                  Accept="application/json", CustomAttributes="trace=abc")
    assert json.loads(response["Body"].read())["echo"] == {"a": 2}
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
