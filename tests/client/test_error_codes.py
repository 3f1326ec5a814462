"""One error vocabulary: every daemon error carries ``X-Sdmaker-Error-Code``, and the client maps that code
(never the message text) to the :mod:`sdmaker.errors` class.

In process: the daemon app under Starlette's TestClient (no workers are started: no endpoint is
created), and a mock transport standing in for a daemon whose messages have changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from sdmaker.client import Client
from sdmaker.config import Settings
from sdmaker.errors import (
    ERROR_CODE_HEADER,
    AuthenticationError,
    ControlPlaneError,
    EndpointExistsError,
    EndpointNotFoundError,
    EndpointNotReadyError,
    InvalidRequestError,
    InvocationFailedError,
    PayloadTooLargeError,
    QueueFullError,
    SdmakerError,
    ServingError,
    error_class_for_code,
)

TOKEN = "test-token"
_JSON11 = "application/x-amz-json-1.1"


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from sdmaker.serving.daemon._app import create_app

    settings = Settings(home=tmp_path_factory.mktemp("codes-home"), standby_workers=0, require_auth=True,
                        auth_token=TOKEN, log_max_bytes=0)
    with TestClient(create_app(settings, host="127.0.0.1", port=8765), raise_server_exceptions=False,
                    base_url="http://127.0.0.1:8765") as tc:
        yield tc


def _auth(**headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **headers}


def _sm(tc: TestClient, operation: str, body: Any, *, auth: bool = True) -> httpx.Response:
    headers = {"X-Amz-Target": f"SageMaker.{operation}", "Content-Type": _JSON11}
    return tc.post("/", content=body if isinstance(body, bytes) else json.dumps(body),
                   headers=_auth(**headers) if auth else headers)


def _client(tc: TestClient, token: str | None = TOKEN) -> Client:
    """A :class:`Client` whose requests go to the in-process daemon."""
    def forward(request: httpx.Request) -> httpx.Response:
        reply = tc.request(request.method, str(request.url), headers=dict(request.headers), content=request.content)
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    return Client("http://127.0.0.1:8765", token=token or "", transport=httpx.MockTransport(forward),
                  settings=Settings(home=Path("/nonexistent")))


def _model(name: str) -> dict[str, Any]:
    return {"ModelName": name, "PrimaryContainer": {"Image": "x", "ModelDataUrl": "/nowhere"},
            "ExecutionRoleArn": "arn:aws:iam::000000000000:role/r"}


# --- the daemon: every error answer carries the code ------------------------------------------------


def test_control_plane_errors_carry_the_code(app_client: TestClient) -> None:
    tc = app_client
    assert _sm(tc, "CreateModel", _model("codes-m")).status_code == 200
    cases = [
        (_sm(tc, "CreateModel", _model("codes-m")), "ValidationException", "EndpointExistsError"),
        (_sm(tc, "DescribeModel", {"ModelName": "codes-none"}), "ValidationException", "EndpointNotFoundError"),
        (_sm(tc, "DescribeEndpoint", {"EndpointName": "codes-none"}), "ValidationException",
         "EndpointNotFoundError"),
        (_sm(tc, "DescribeEndpointConfig", {"EndpointConfigName": "codes-none"}), "ValidationException",
         "EndpointNotFoundError"),
        (_sm(tc, "CreateEndpointConfig", {"EndpointConfigName": "codes-c", "ProductionVariants": [
            {"VariantName": "AllTraffic", "ModelName": "codes-none", "InitialInstanceCount": 1}]}),
         "ValidationException", "EndpointNotFoundError"),
        (_sm(tc, "CreateEndpoint", {"EndpointName": "codes-e", "EndpointConfigName": "codes-none"}),
         "ValidationException", "EndpointNotFoundError"),
        (_sm(tc, "DescribeEndpoint", {"EndpointName": "bad_name"}), "ValidationException", "InvalidRequestError"),
        (_sm(tc, "CreateModel", {"ModelName": "codes-x"}), "ValidationException", "InvalidRequestError"),
        (_sm(tc, "CreateTrainingJob", {}), "UnknownOperationException", "InvalidRequestError"),
        (_sm(tc, "DescribeEndpoint", b"{not json"), "SerializationException", "InvalidRequestError"),
        (_sm(tc, "DescribeEndpoint", b"[1]"), "SerializationException", "InvalidRequestError"),
        (_sm(tc, "DescribeEndpoint", {"EndpointName": "codes-none"}, auth=False), "InvalidSignatureException",
         "AuthenticationError"),
    ]
    for reply, aws_code, sdmaker_code in cases:
        assert 400 <= reply.status_code < 500, reply.text
        assert reply.json()["__type"] == aws_code, reply.text
        assert reply.headers[ERROR_CODE_HEADER] == sdmaker_code, (reply.text, reply.headers)


def test_runtime_errors_carry_the_code(app_client: TestClient) -> None:
    tc = app_client
    path = "/endpoints/codes-none/invocations"
    cases = [
        (tc.post(path, content=b'{"prompt": "x"}', headers=_auth(**{"Content-Type": "application/json"})),
         400, "ValidationError", "EndpointNotFoundError"),
        (tc.post(path, content=b"x" * (6 * 1024 * 1024 + 1), headers=_auth()), 413, "ValidationError",
         "PayloadTooLargeError"),
        (tc.post(path, content=b'{"prompt": "x"}'), 403, "InvalidSignatureException", "AuthenticationError"),
    ]
    for reply, status, aws_code, sdmaker_code in cases:
        assert reply.status_code == status, reply.text
        assert reply.headers["x-amzn-ErrorType"] == aws_code
        assert reply.headers[ERROR_CODE_HEADER] == sdmaker_code


def test_sdmaker_and_framework_errors_carry_the_code(app_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdmaker.serving.daemon._endpoints import EndpointManager

    tc = app_client
    cases = [
        (tc.get("/sdmaker/v1/endpoints/codes-none", headers=_auth()), 404, "EndpointNotFoundError"),
        (tc.get("/sdmaker/v1/endpoints/codes-none/logs", headers=_auth()), 404, "EndpointNotFoundError"),
        (tc.get("/sdmaker/v1/endpoints"), 403, "AuthenticationError"),
        (tc.get("/metrics", headers={"Authorization": "Bearer wrong"}), 403, "AuthenticationError"),
        (tc.get("/no/such/route", headers=_auth()), 404, "InvalidRequestError"),
        (tc.delete("/sdmaker/v1/endpoints", headers=_auth()), 405, "InvalidRequestError"),
        (tc.get("/sdmaker/v1/endpoints/x/logs", params={"offset": "abc"}, headers=_auth()), 422,
         "InvalidRequestError"),
    ]
    for reply, status, sdmaker_code in cases:
        assert reply.status_code == status, reply.text
        assert reply.headers[ERROR_CODE_HEADER] == sdmaker_code, reply.text

    def broken(self: EndpointManager, name: str) -> dict[str, Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(EndpointManager, "details", broken)
    crash = tc.get("/sdmaker/v1/endpoints/anything", headers=_auth())
    assert crash.status_code == 500
    assert crash.headers[ERROR_CODE_HEADER] == "ServingError"
    assert "a bug" not in crash.text  # internals stay in the daemon's log


def test_the_client_raises_the_daemons_classes(app_client: TestClient) -> None:
    with _client(app_client) as client:
        client.sagemaker("CreateModel", _model("codes-cl"))
        with pytest.raises(EndpointExistsError):
            client.sagemaker("CreateModel", _model("codes-cl"))
        with pytest.raises(EndpointNotFoundError):
            client.describe_endpoint("codes-none")
        with pytest.raises(EndpointNotFoundError):
            client.sagemaker("DescribeEndpoint", {"EndpointName": "codes-none"})
        with pytest.raises(InvalidRequestError):
            client.sagemaker("DescribeEndpoint", {"EndpointName": "bad_name"})
        with pytest.raises(EndpointNotFoundError):
            client.invoke("codes-none", {"prompt": "x"})
        with pytest.raises(PayloadTooLargeError):
            client.invoke("codes-none", b"x" * (6 * 1024 * 1024 + 1))
        with pytest.raises(EndpointNotFoundError):  # DeleteEndpoint's describe first
            client.delete_endpoint("codes-none")
    with _client(app_client, token=None) as anonymous, pytest.raises(AuthenticationError):
        anonymous.list_endpoints()


# --- the client: codes, not texts ----------------------------------------------------------------------


def _replying(status: int, body: dict[str, Any], headers: dict[str, str]) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    return Client("http://daemon.test", transport=httpx.MockTransport(handler),
                  settings=Settings(home=Path("/nonexistent")))


@pytest.mark.parametrize(("code", "cls"), [
    ("EndpointNotFoundError", EndpointNotFoundError),
    ("EndpointExistsError", EndpointExistsError),
    ("EndpointNotReadyError", EndpointNotReadyError),
    ("InvalidRequestError", InvalidRequestError),
    ("QueueFullError", QueueFullError),
    ("InvocationFailedError", InvocationFailedError),
    ("AuthenticationError", AuthenticationError),
    ("PayloadTooLargeError", PayloadTooLargeError),
])
@pytest.mark.parametrize("message", ["Could not find endpoint", "Cannot create already existing endpoint",
                                     "an entirely reworded message", ""])
def test_the_code_decides_whatever_the_message_says(code: str, cls: type[SdmakerError], message: str) -> None:
    with _replying(400, {"__type": "ValidationException", "message": message}, {ERROR_CODE_HEADER: code}) as c, \
            pytest.raises(SdmakerError) as info:
        c.describe_endpoint("x")
    assert type(info.value) is cls
    assert info.value.fields["aws_code"] == "ValidationException" and info.value.fields["http_status"] == 400


@pytest.mark.parametrize(("status", "cls"), [(400, InvalidRequestError), (404, InvalidRequestError),
                                             (500, ServingError), (502, ServingError)])
def test_without_a_code_the_message_is_not_read(status: int, cls: type[SdmakerError]) -> None:
    """A proxy's answer (no code): classified by status only, even when its text sounds like a known error."""
    for message in ("Could not find endpoint x", "Cannot create already existing endpoint x"):
        with _replying(status, {"message": message}, {}) as c, pytest.raises(SdmakerError) as info:
            c.describe_endpoint("x")
        assert type(info.value) is cls
        assert info.value.message == message


def test_invalid_request_fields_survive_the_wire() -> None:
    body = {"error": "InvalidRequestError", "message": "height=65: ...", "field": "height", "value": 65,
            "allowed": "64..2048, multiple of 8"}
    with _replying(400, body, {ERROR_CODE_HEADER: "InvalidRequestError"}) as c, \
            pytest.raises(InvalidRequestError) as info:
        c.invoke("x", {"prompt": "x"})
    assert (info.value.field, info.value.value, info.value.allowed) == ("height", 65, "64..2048, multiple of 8")


def test_control_plane_error_joins_the_tree() -> None:
    err = ControlPlaneError('Could not find endpoint "arn".', kind=EndpointNotFoundError)
    assert isinstance(err, ServingError)
    assert (err.aws_code, err.status, err.code, err.message) == (
        "ValidationException", 400, "EndpointNotFoundError", 'Could not find endpoint "arn".')
    assert ControlPlaneError("bad input").code == "InvalidRequestError"
    assert ControlPlaneError("boom", "InternalFailure", 500).code == "ServingError"
    assert error_class_for_code("EndpointNotFoundError") is EndpointNotFoundError
    assert error_class_for_code("no such code") is SdmakerError


# --- Client.generate follows the schema ---------------------------------------------------------------


def _capturing() -> tuple[Client, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"generated_images": [], "seeds": []})

    client = Client("http://daemon.test", transport=httpx.MockTransport(handler),
                    settings=Settings(home=Path("/nonexistent")))
    return client, sent


def test_generate_takes_every_schema_field() -> None:
    import inspect

    from sdmaker.schema import GenerateRequest

    params = inspect.signature(Client.generate).parameters
    assert set(GenerateRequest.model_fields) <= set(params)
    assert "deep_cache_interval" in (Client.generate.__doc__ or "")

    client, sent = _capturing()
    with client:
        client.generate("ep", prompt="a cat", deep_cache_interval=2, num_inference_steps=4, height=None)
        client.generate("ep", "a dog", seed=3)  # the prompt may be positional
        client.generate("ep", prompt=["a", "b"], negative_prompt=None, scheduler="euler", format="png")
    assert sent[0] == {"prompt": "a cat", "deep_cache_interval": 2, "num_inference_steps": 4, "format": "jpeg",
                       "quality": 90}
    assert sent[1]["prompt"] == "a dog" and sent[1]["seed"] == 3
    assert sent[2]["scheduler"] == "euler" and sent[2]["format"] == "png" and "negative_prompt" not in sent[2]


def test_generate_validates_before_sending() -> None:
    client, sent = _capturing()
    with client:
        with pytest.raises(InvalidRequestError, match="unknown field"):
            client.generate("ep", prompt="x", steps=3)
        with pytest.raises(InvalidRequestError) as info:
            client.generate("ep", prompt="x", deep_cache_interval=11)
        assert info.value.field == "deep_cache_interval"
        with pytest.raises(InvalidRequestError, match="must be an integer"):
            client.generate("ep", prompt="x", height="64")
        with pytest.raises(InvalidRequestError) as info:
            client.generate("ep")
        assert info.value.field == "prompt"
    assert sent == []
