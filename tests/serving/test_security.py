"""Issue 12: no code runs for a web page, no way around the daemon's auth (Host/Origin, workers, payloads,
caps, the local key). Real daemon processes where the behaviour is the daemon's; unit checks otherwise."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from sdmaker.config import Settings, load_settings
from sdmaker.errors import AuthenticationError, ConfigError, InvalidRequestError
from sdmaker.local_key import ensure_local_key, local_key_path, read_local_key
from sdmaker.serving._hosts import HostPolicy, split_host
from sdmaker.serving.daemon._auth import verify_request
from sdmaker.serving.daemon._limits import check_endpoint_config, check_model

_JSON11 = "application/x-amz-json-1.1"
FOREIGN = "rebind.attacker.example"


# -- Host and Origin -------------------------------------------------------------------------------------


def test_host_policy() -> None:
    assert split_host("[::1]:8765") == ("::1", 8765) and split_host("LocalHost.") == ("localhost", None)
    assert split_host("a:b") == ("", None) and split_host("::1") == ("", None)
    loop = HostPolicy("127.0.0.1", 8765)
    for ok in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
        assert loop.allows_host(ok), ok
    for bad in (f"{FOREIGN}:8765", FOREIGN, "127.0.0.1:9999", "127.0.0.1", "", "localhost.attacker.example:8765",
                "10.0.0.1:8765"):
        assert not loop.allows_host(bad), bad
    assert HostPolicy("127.0.0.1", 8765, ("my.proxy",)).allows_host("my.proxy:443")
    assert HostPolicy("127.0.0.1", 8765, ("*",)).allows_host(f"{FOREIGN}:1")
    lan = HostPolicy("192.168.1.5", 8765)
    assert lan.allows_host("192.168.1.5:8765") and not lan.allows_host("localhost:8765")
    anywhere = HostPolicy("0.0.0.0", 8765)
    assert anywhere.allows_host("10.1.2.3:8765") and not anywhere.allows_host(f"{FOREIGN}:8765")
    assert loop.allows_origin("http://127.0.0.1:8765") and loop.allows_origin("http://localhost:8765")
    for bad in (f"http://{FOREIGN}:8765", "null", "http://127.0.0.1:3000", "file://"):
        assert not loop.allows_origin(bad), bad


def _post(url: str, target: str, body: dict, **headers: str) -> httpx.Response:  # type: ignore[type-arg]
    return httpx.post(url + "/", content=json.dumps(body), timeout=30,
                      headers={"X-Amz-Target": f"SageMaker.{target}", "Content-Type": _JSON11, **headers})


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["x-amzn-errortype"] == "AccessDeniedException"
    assert "SDMAKER_ALLOWED_HOSTS" in response.json()["message"]
    assert "access-control-allow-origin" not in response.headers


@pytest.fixture(scope="module")
def evil_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model whose code writes a marker file when it is imported: proof that code ran."""
    root = tmp_path_factory.mktemp("evil-model")
    marker = root.parent / f"{root.name}-PWNED"
    (root / "code").mkdir()
    (root / "code" / "inference.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\n"
        "def model_fn(model_dir):\n    return None\n\ndef predict_fn(data, model):\n    return data\n")
    return root, marker


def test_rebinding_deploy_sequence_runs_no_code(daemon, evil_model) -> None:  # type: ignore[no-untyped-def]
    model_dir, marker = evil_model
    port = daemon.url.rsplit(":", 1)[1]
    steps = [("CreateModel", {"ModelName": "pwn", "ExecutionRoleArn": "arn:aws:iam::1:role/r",
                              "PrimaryContainer": {"Image": "x", "ModelDataUrl": str(model_dir)}}),
             ("CreateEndpointConfig", {"EndpointConfigName": "pwn", "ProductionVariants": [
                 {"VariantName": "AllTraffic", "ModelName": "pwn", "InitialInstanceCount": 1}]}),
             ("CreateEndpoint", {"EndpointName": "pwn", "EndpointConfigName": "pwn"})]
    attempts = [{"Host": f"{FOREIGN}:{port}"}, {"Host": FOREIGN},
                {"Host": f"127.0.0.1:{port}", "Origin": f"http://{FOREIGN}:{port}"},
                {"Host": f"{FOREIGN}:{port}", "Origin": f"http://{FOREIGN}:{port}"}]
    for headers in attempts:
        for target, body in steps:
            _assert_refused(_post(daemon.url, target, body, **headers))
    _assert_refused(httpx.post(f"{daemon.url}/endpoints/pwn/invocations", content=b"{}", timeout=30,
                               headers={"Host": f"{FOREIGN}:{port}", "Content-Type": "application/json"}))
    _assert_refused(httpx.get(f"{daemon.url}/metrics", headers={"Host": FOREIGN}, timeout=30))
    _assert_refused(httpx.get(f"{daemon.url}/ping", headers={"Host": FOREIGN}, timeout=30))
    preflight = httpx.options(daemon.url + "/", timeout=30, headers={
        "Origin": f"http://{FOREIGN}", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    sm = daemon.boto("sagemaker")
    with pytest.raises(ClientError, match="Could not find model"):
        sm.describe_model(ModelName="pwn")
    with pytest.raises(ClientError, match="Could not find endpoint"):
        sm.describe_endpoint(EndpointName="pwn")
    assert not marker.exists()
    # the daemon's own names still work, from a same-origin page too
    same = _post(daemon.url, "ListEndpoints", {}, Origin=daemon.url)
    assert same.status_code == 200, same.text
    assert httpx.get(daemon.url.replace("127.0.0.1", "localhost") + "/ping", timeout=30).status_code == 200


# -- workers trust only their daemon ----------------------------------------------------------------------


def test_worker_refuses_invocations_without_its_secret(daemon, scripted_model_dir) -> None:  # type: ignore[no-untyped-def]
    desc = daemon.deploy("sec-worker", scripted_model_dir)
    assert desc["EndpointStatus"] == "InService"
    rt = daemon.boto("sagemaker-runtime")
    reply = rt.invoke_endpoint(EndpointName="sec-worker", Body=b'{"x": 1}', ContentType="application/json")
    assert json.loads(reply["Body"].read())["echo"] == {"x": 1}
    details = httpx.get(f"{daemon.url}/sdmaker/v1/endpoints/sec-worker", timeout=30).json()
    ports = [w["port"] for w in details["workers"]]
    assert ports
    for port in ports:
        worker = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{worker}/ping", timeout=30).status_code == 200
        for headers in ({}, {"Authorization": "Bearer guess"}):
            refused = httpx.post(f"{worker}/invocations", content=b'{"x": 2}', timeout=30,
                                 headers={"Content-Type": "application/json", **headers})
            assert refused.status_code == 403, refused.text
        rebound = httpx.post(f"{worker}/invocations", content=b"{}", headers={"Host": FOREIGN}, timeout=30)
        assert rebound.status_code == 403
    daemon.boto("sagemaker").delete_endpoint(EndpointName="sec-worker")


# -- SigV4 payloads ----------------------------------------------------------------------------------------

_AUTH = Settings(home=Path("/nonexistent"), auth_access_key_id="AKIDTEST", auth_secret_access_key="secret-1")


def _sign(body: bytes, *, unsigned: bool) -> dict:  # type: ignore[type-arg]
    url = "http://127.0.0.1:8765/endpoints/demo/invocations"
    headers = {"Content-Type": "application/json"}
    if unsigned:
        headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(Credentials("AKIDTEST", "secret-1"), "sagemaker", "us-east-1").add_auth(request)
    out: dict[str, list[str]] = {"host": ["127.0.0.1:8765"]}
    for name, value in request.headers.items():
        out.setdefault(name.lower(), []).append(value if isinstance(value, str) else value.decode())
    return {"method": "POST", "path": "/endpoints/demo/invocations", "query": "", "headers": out, "body": body}


def test_unsigned_payload_cannot_carry_a_swapped_body() -> None:
    captured = _sign(b'{"prompt": "a cat"}', unsigned=True)
    for body in (b'{"prompt": "a cat"}', b'{"prompt": "something else entirely"}'):
        with pytest.raises(AuthenticationError, match="UNSIGNED-PAYLOAD is refused"):
            verify_request(_AUTH, **{**captured, "body": body})
    empty = _sign(b"", unsigned=True)  # nothing to swap: still fine
    assert verify_request(_AUTH, **empty) == "sigv4:AKIDTEST"
    assert verify_request(_AUTH, **_sign(b'{"prompt": "a cat"}', unsigned=False)) == "sigv4:AKIDTEST"


def test_boto3_signs_the_payload_over_http() -> None:
    """What boto3 really sends to an http endpoint URL: the body's SHA-256, so the refusal breaks nothing."""
    import boto3

    seen: list[dict[str, str]] = []

    class Captured(Exception):
        pass

    def capture(request, **_: object) -> None:  # type: ignore[no-untyped-def]
        seen.append({k.lower(): (v if isinstance(v, str) else v.decode()) for k, v in request.headers.items()})
        raise Captured

    for service, call in (("sagemaker-runtime", lambda c: c.invoke_endpoint(EndpointName="e", Body=b'{"a": 1}',
                                                                            ContentType="application/json")),
                          ("sagemaker", lambda c: c.list_endpoints())):
        client = boto3.client(service, endpoint_url="http://127.0.0.1:1", region_name="us-east-1",
                              aws_access_key_id="k", aws_secret_access_key="s")
        client.meta.events.register("before-send", capture)
        with pytest.raises(Captured):
            call(client)
    for headers in seen:
        assert headers.get("x-amz-content-sha256", "") != "UNSIGNED-PAYLOAD"
        assert "authorization" in headers


# -- caps ----------------------------------------------------------------------------------------------------


def test_caps_name_the_field_and_the_limit() -> None:
    settings = Settings(home=Path("/nonexistent"), max_instances=16)
    variant = {"VariantName": "AllTraffic", "ModelName": "m", "InitialInstanceCount": 1}
    check_endpoint_config({"ProductionVariants": [variant]}, settings)
    cases = [
        ({**variant, "InitialInstanceCount": 100000}, "initialInstanceCount.*less than or equal to 16.*"
                                                      "SDMAKER_MAX_INSTANCES"),
        ({**variant, "InitialInstanceCount": 0}, "greater than or equal to 1"),
        ({**variant, "InitialInstanceCount": True}, "must be an integer"),
        ({**variant, "ContainerStartupHealthCheckTimeoutInSeconds": 10**9}, "containerStartupHealthCheck.*3600"),
        ({**variant, "ServerlessConfig": {"MaxConcurrency": 5000}}, "maxConcurrency.*200"),
        ({**variant, "VariantName": "v" * 500}, "variantName.*length less than or equal to 63"),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            check_endpoint_config({"ProductionVariants": [bad]}, settings)
    with pytest.raises(InvalidRequestError, match="productionVariants.*less than or equal to 10"):
        check_endpoint_config({"ProductionVariants": [variant] * 11}, settings)
    with pytest.raises(InvalidRequestError, match=r"4 x 8.*less than or equal to 16"):
        check_endpoint_config({"ProductionVariants": [{**variant, "InitialInstanceCount": 4}]}, settings,
                              {"m": {"SAGEMAKER_MODEL_SERVER_WORKERS": "8"}})
    with pytest.raises(InvalidRequestError, match="maxConcurrentInvocationsPerInstance.*1000"):
        check_endpoint_config({"ProductionVariants": [variant], "AsyncInferenceConfig": {
            "OutputConfig": {"S3OutputPath": "s3://bucket/out"},
            "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 10**6}}}, settings)
    model_cases = [
        ({"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "99999"}, "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS.*3600"),
        ({"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "soon"}, "must be a number"),
        ({"SDMAKER_MAX_QUEUE": "100000000"}, "SDMAKER_MAX_QUEUE.*10000"),
        ({"SAGEMAKER_MODEL_SERVER_WORKERS": "1000"}, "SAGEMAKER_MODEL_SERVER_WORKERS.*16"),
        ({"A": "x" * 5000}, "environment.A.*1024"),
        ({f"K{i}": "v" for i in range(101)}, "at most 100 entries"),
        ({"bad key": "v"}, "Map keys must match"),
    ]
    for env, message in model_cases:
        with pytest.raises(InvalidRequestError, match=message):
            check_model({"PrimaryContainer": {"Image": "x", "Environment": env}}, settings)
    with pytest.raises(InvalidRequestError, match="modelDataUrl.*1024"):
        check_model({"PrimaryContainer": {"ModelDataUrl": "s3://b/" + "k" * 2000}}, settings)


def test_instance_count_cap_on_the_wire(daemon, scripted_model_dir) -> None:  # type: ignore[no-untyped-def]
    sm = daemon.boto("sagemaker")
    sm.create_model(ModelName="sec-caps", ExecutionRoleArn="arn:aws:iam::1:role/r",
                    PrimaryContainer={"Image": "x", "ModelDataUrl": str(scripted_model_dir)})
    with pytest.raises(ClientError) as info:
        sm.create_endpoint_config(EndpointConfigName="sec-caps", ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "sec-caps", "InitialInstanceCount": 100000}])
    error = info.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert "initialInstanceCount" in error["Message"] and "SDMAKER_MAX_INSTANCES" in error["Message"]
    with pytest.raises(ClientError, match="Could not find endpoint configuration"):
        sm.describe_endpoint_config(EndpointConfigName="sec-caps")
    with pytest.raises(ClientError, match="SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"):
        sm.create_model(ModelName="sec-caps2", ExecutionRoleArn="arn:aws:iam::1:role/r", PrimaryContainer={
            "Image": "x", "ModelDataUrl": str(scripted_model_dir),
            "Environment": {"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "1e9"}})
    sm.delete_model(ModelName="sec-caps")


# -- the local key -------------------------------------------------------------------------------------------


def test_local_key_file(tmp_path: Path) -> None:
    assert read_local_key(tmp_path) is None
    key = ensure_local_key(tmp_path)
    path = local_key_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_local_key(tmp_path) == key == read_local_key(tmp_path)  # created once, then reused
    settings = load_settings({"SDMAKER_HOME": str(tmp_path), "SDMAKER_LOCAL_KEY": "1"})
    assert (settings.auth_access_key_id, settings.auth_secret_access_key) == (key.access_key_id, key.secret_access_key)
    assert settings.local_token == key.secret_access_key and settings.auth_token is None
    explicit = load_settings({"SDMAKER_HOME": str(tmp_path), "SDMAKER_LOCAL_KEY": "1",
                              "SDMAKER_ACCESS_KEY_ID": "AKIAREAL", "SDMAKER_SECRET_ACCESS_KEY": "real-secret"})
    assert explicit.auth_access_key_id == "AKIAREAL"  # the user's own (S3) key pair wins
    assert load_settings({"SDMAKER_HOME": str(tmp_path)}).auth_access_key_id is None  # off unless asked
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        read_local_key(tmp_path)


def test_local_key_guards_the_control_plane(tmp_path: Path, scripted_model_dir: Path) -> None:
    from conftest import DaemonProcess

    home = tmp_path / "home"
    d = DaemonProcess(home, env={"SDMAKER_LOCAL_KEY": "1", "SDMAKER_STANDBY_WORKERS": "0"}).start()
    try:
        key = read_local_key(home)
        assert key is not None
        assert stat.S_IMODE(local_key_path(home).stat().st_mode) == 0o600
        model = {"ModelName": "lk", "ExecutionRoleArn": "arn:aws:iam::1:role/r",
                 "PrimaryContainer": {"Image": "x", "ModelDataUrl": str(scripted_model_dir)}}
        with pytest.raises(ClientError) as info:  # another local user: no key
            d.boto("sagemaker").create_model(**model)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert _post(d.url, "CreateModel", model).status_code == 403
        # boto3/SDK with what `sdmaker env` exports
        env = {**os.environ, "SDMAKER_HOME": str(home), "SDMAKER_LOCAL_KEY": "1", "SDMAKER_URL": d.url}
        env.pop("SDMAKER_ACCESS_KEY_ID", None)
        out = subprocess.run([sys.executable, "-m", "sdmaker", "env"], env=env, capture_output=True, text=True,
                             check=True).stdout
        assert f"AWS_ACCESS_KEY_ID={key.access_key_id}" in out
        sm = d.boto("sagemaker", key=key.access_key_id, secret=key.secret_access_key)
        sm.create_model(**model)
        # the Python client (bearer) picks the key up from the home
        from sdmaker.client import Client

        with Client(settings=load_settings(env)) as client:
            assert client.sagemaker("DescribeModel", {"ModelName": "lk"})["ModelName"] == "lk"
        sm.delete_model(ModelName="lk")
    finally:
        d.stop()
