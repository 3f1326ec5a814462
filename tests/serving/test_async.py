"""Asynchronous inference (issue 13): InvokeEndpointAsync with boto3 and the SageMaker SDK, job status,
cancel, bad input. The shared ``daemon`` fixture (S3 = the moto server); most endpoints run the scripted
model (a request chooses to sleep, fail or echo), one the tiny Stable Diffusion through the SDK."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

TERMINAL = {"succeeded", "failed", "expired", "cancelled"}


def s3_client(moto_url: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def deploy_async(daemon: Any, name: str, model: str | Path, output: str, *, failure: str | None = None,
                 max_concurrent: int | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """CreateModel + CreateEndpointConfig with an AsyncInferenceConfig + CreateEndpoint; waits for InService."""
    sm = daemon.boto("sagemaker")
    sm.create_model(ModelName=f"{name}-m", ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                    PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": str(model), "Environment": env or {}})
    config: dict[str, Any] = {"OutputConfig": {"S3OutputPath": output, "NotificationConfig": {
        "SuccessTopic": "arn:aws:sns:us-east-1:111122223333:ok"}}}
    if failure:
        config["OutputConfig"]["S3FailurePath"] = failure
    if max_concurrent:
        config["ClientConfig"] = {"MaxConcurrentInvocationsPerInstance": max_concurrent}
    sm.create_endpoint_config(EndpointConfigName=f"{name}-c", AsyncInferenceConfig=config, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": f"{name}-m", "InitialInstanceCount": 1,
        "InstanceType": "ml.m5.large"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-c")
    sm.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 0.5, "MaxAttempts": 600})
    return dict(sm.describe_endpoint(EndpointName=name))


def job(url: str, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/sdmaker/v1/jobs/{job_id}", timeout=30).json())


def wait_terminal(url: str, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = job(url, job_id)
        if info["state"] in TERMINAL:
            return info
        assert time.monotonic() < deadline, f"job {job_id} still {info['state']}"
        time.sleep(0.2)


def read_s3(s3: Any, uri: str) -> tuple[bytes, str]:
    bucket, key = uri[len("s3://"):].split("/", 1)
    obj = s3.get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj["ContentType"]


def s3_has(s3: Any, uri: str) -> bool:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return "Contents" in s3.list_objects_v2(Bucket=bucket, Prefix=key)


@pytest.fixture(scope="module")
def bucket(moto_server: str) -> str:
    name = f"async-{uuid.uuid4().hex[:10]}"
    s3_client(moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def echo_endpoint(daemon: Any, scripted_model_dir: Path, bucket: str) -> str:
    """A scripted-model endpoint with an AsyncInferenceConfig, one job at a time."""
    deploy_async(daemon, "async-echo", scripted_model_dir, f"s3://{bucket}/out", failure=f"s3://{bucket}/failed",
                 max_concurrent=1, env={"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "120"})
    return "async-echo"


def test_boto3_invoke_endpoint_async_writes_where_it_answers(daemon: Any, echo_endpoint: str, bucket: str,
                                                             moto_server: str) -> None:
    sm, rt, s3 = daemon.boto("sagemaker"), daemon.boto("sagemaker-runtime"), s3_client(moto_server)
    config = sm.describe_endpoint_config(EndpointConfigName=f"{echo_endpoint}-c")["AsyncInferenceConfig"]
    assert config["OutputConfig"]["NotificationConfig"]["SuccessTopic"].endswith(":ok")
    assert config["ClientConfig"]["MaxConcurrentInvocationsPerInstance"] == 1
    assert sm.describe_endpoint(EndpointName=echo_endpoint)["AsyncInferenceConfig"] == config

    s3.put_object(Bucket=bucket, Key="in/hello.json", Body=b'{"hello": "s3"}', ContentType="application/json")
    answer = rt.invoke_endpoint_async(EndpointName=echo_endpoint, InputLocation=f"s3://{bucket}/in/hello.json",
                                      ContentType="application/json", Accept="application/json",
                                      InferenceId="my-job-1", CustomAttributes="trace=1")
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert answer["InferenceId"] == "my-job-1"
    assert answer["OutputLocation"] == f"s3://{bucket}/out/my-job-1.out"
    assert answer["FailureLocation"] == f"s3://{bucket}/failed/my-job-1-error.out"
    inline = rt.invoke_endpoint_async(EndpointName=echo_endpoint, Body=b'{"hello": "inline"}',
                                      ContentType="application/json", RequestTTLSeconds=600,
                                      InvocationTimeoutSeconds=60, S3OutputPathExtension="ext/dir",
                                      Filename="result.json")
    assert inline["OutputLocation"] == f"s3://{bucket}/out/ext/dir/result.json"

    done = wait_terminal(daemon.url, "my-job-1")
    assert done["state"] == "succeeded" and done["attempts"] == 1 and done["finished"] >= done["started"]
    body, content_type = read_s3(s3, answer["OutputLocation"])
    assert content_type == "application/json" and json.loads(body)["echo"] == {"hello": "s3"}
    assert not s3_has(s3, answer["FailureLocation"])
    other = wait_terminal(daemon.url, inline["InferenceId"])
    assert other["state"] == "succeeded" and other["ttl_s"] == 600 and other["timeout_s"] == 60
    assert json.loads(read_s3(s3, inline["OutputLocation"])[0])["echo"] == {"hello": "inline"}

    # the same InferenceId again answers the same job: a retried submit never runs twice
    again = rt.invoke_endpoint_async(EndpointName=echo_endpoint, InputLocation=f"s3://{bucket}/in/hello.json",
                                     InferenceId="my-job-1")
    assert again["OutputLocation"] == answer["OutputLocation"] and job(daemon.url, "my-job-1")["attempts"] == 1

    listed = httpx.get(f"{daemon.url}/sdmaker/v1/jobs", params={"endpoint": echo_endpoint, "state": "succeeded"}).json()
    assert {"my-job-1", inline["InferenceId"]} <= {j["id"] for j in listed["jobs"]}
    assert all(j["endpoint"] == echo_endpoint and j["state"] == "succeeded" for j in listed["jobs"])
    metrics = httpx.get(f"{daemon.url}/metrics").text
    assert f'sdmaker_async_approximate_backlog_size{{endpoint="{echo_endpoint}"}} 0.0' in metrics
    assert f'sdmaker_async_approximate_age_of_oldest_request_seconds{{endpoint="{echo_endpoint}"}}' in metrics
    details = httpx.get(f"{daemon.url}/sdmaker/v1/endpoints/{echo_endpoint}").json()
    assert details["ApproximateBacklogSize"] == 0


def test_failures_go_to_the_failure_location_with_the_reason(daemon: Any, echo_endpoint: str, bucket: str,
                                                            moto_server: str) -> None:
    rt, s3 = daemon.boto("sagemaker-runtime"), s3_client(moto_server)
    missing = rt.invoke_endpoint_async(EndpointName=echo_endpoint, InputLocation=f"s3://{bucket}/in/nothing.json")
    no_bucket = rt.invoke_endpoint_async(EndpointName=echo_endpoint, InputLocation="s3://no-such-bucket-x/in.json")
    model_error = rt.invoke_endpoint_async(EndpointName=echo_endpoint, Body=b'{"fail": "boom"}',
                                           ContentType="application/json")
    too_slow = rt.invoke_endpoint_async(EndpointName=echo_endpoint, Body=b'{"sleep": 5}',
                                        ContentType="application/json", InvocationTimeoutSeconds=1)
    for answer, code, words in ((missing, "InputLocationError", "nothing.json: no such object"),
                                (no_bucket, "InputLocationError", "does not exist"),
                                (model_error, "ModelError", "boom"),
                                (too_slow, "ModelInvocationTimeExceeded", "InvocationTimeoutSeconds (1 s)")):
        info = wait_terminal(daemon.url, answer["InferenceId"])
        assert info["state"] == "failed" and words in info["failure_reason"], info
        failure = json.loads(read_s3(s3, answer["FailureLocation"])[0])
        assert failure["ErrorCode"] == code and words in failure["Message"]
        assert failure["InferenceId"] == answer["InferenceId"]
        assert not s3_has(s3, answer["OutputLocation"])
    # nothing crashed: the endpoint serves the next job
    ok = rt.invoke_endpoint_async(EndpointName=echo_endpoint, Body=b'{"after": 1}', ContentType="application/json")
    assert wait_terminal(daemon.url, ok["InferenceId"])["state"] == "succeeded"


def test_queue_position_and_cancel(daemon: Any, echo_endpoint: str, moto_server: str) -> None:
    rt, s3 = daemon.boto("sagemaker-runtime"), s3_client(moto_server)
    first = rt.invoke_endpoint_async(EndpointName=echo_endpoint, Body=b'{"sleep": 30}', ContentType="application/json")
    rest = [rt.invoke_endpoint_async(EndpointName=echo_endpoint, Body=json.dumps({"n": i}).encode(),
                                     ContentType="application/json") for i in range(3)]
    deadline = time.monotonic() + 60
    while job(daemon.url, first["InferenceId"])["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # MaxConcurrentInvocationsPerInstance=1: the others wait, in order
    assert [job(daemon.url, a["InferenceId"])["queue_position"] for a in rest] == [0, 1, 2]
    backlog = httpx.get(f"{daemon.url}/sdmaker/v1/endpoints/{echo_endpoint}").json()
    assert backlog["ApproximateBacklogSize"] == 4 and backlog["ApproximateAgeOfOldestRequest"] >= 0

    cancelled = httpx.post(f"{daemon.url}/sdmaker/v1/jobs/{rest[1]['InferenceId']}/cancel", timeout=30).json()
    assert cancelled["state"] == "cancelled"
    assert json.loads(read_s3(s3, rest[1]["FailureLocation"])[0])["ErrorCode"] == "Cancelled"
    assert job(daemon.url, rest[2]["InferenceId"])["queue_position"] == 1
    running = httpx.post(f"{daemon.url}/sdmaker/v1/jobs/{first['InferenceId']}/cancel", timeout=30).json()
    assert running["state"] == "cancelled"
    assert not s3_has(s3, first["OutputLocation"])
    for answer in (rest[0], rest[2]):
        assert wait_terminal(daemon.url, answer["InferenceId"])["state"] == "succeeded"
    finished = httpx.post(f"{daemon.url}/sdmaker/v1/jobs/{rest[0]['InferenceId']}/cancel", timeout=30).json()
    assert finished["state"] == "succeeded"  # a finished job is left as it is


def test_bad_requests_are_validation_errors(daemon: Any, echo_endpoint: str, bucket: str, sd1_dir: Path) -> None:
    rt = daemon.boto("sagemaker-runtime")
    where = {"X-Amzn-SageMaker-InputLocation": f"s3://{bucket}/x"}
    cases: list[tuple[dict[str, str], bytes, str]] = [  # raw headers: botocore itself refuses values below a min
        ({**where, "X-Amzn-SageMaker-RequestTTLSeconds": "59"}, b"", "requestTTLSeconds"),
        ({**where, "X-Amzn-SageMaker-RequestTTLSeconds": "21601"}, b"", "requestTTLSeconds"),
        ({**where, "X-Amzn-SageMaker-InvocationTimeoutSeconds": "0"}, b"", "invocationTimeoutSeconds"),
        ({**where, "X-Amzn-SageMaker-InvocationTimeoutSeconds": "soon"}, b"", "invocationTimeoutSeconds"),
        ({"X-Amzn-SageMaker-InputLocation": "https://example.com/x"}, b"", "s3://"),
        (where, b"{}", "mutually exclusive"),
        ({}, b"", "InputLocation"),
        ({**where, "X-Amzn-SageMaker-Filename": "a..b"}, b"", "filename"),
        ({**where, "X-Amzn-SageMaker-Inference-Id": "x" * 65}, b"", "inferenceId"),
    ]
    for headers, body, words in cases:
        answer = httpx.post(f"{daemon.url}/endpoints/{echo_endpoint}/async-invocations", headers=headers,
                            content=body)
        assert answer.status_code == 400 and answer.headers["x-amzn-ErrorType"] == "ValidationError", answer.text
        assert words in answer.json()["message"]
    big = httpx.post(f"{daemon.url}/endpoints/{echo_endpoint}/async-invocations", content=b"x" * 128_001)
    assert big.status_code == 413 and big.headers["x-amzn-ErrorType"] == "ValidationError"
    with pytest.raises(rt.exceptions.ValidationError, match="not found"):
        rt.invoke_endpoint_async(EndpointName="no-such-endpoint", InputLocation=f"s3://{bucket}/x")
    # an endpoint without AsyncInferenceConfig refuses, as AWS does
    daemon.deploy("async-realtime", sd1_dir)
    with pytest.raises(rt.exceptions.ValidationError, match="AsyncInferenceConfig"):
        rt.invoke_endpoint_async(EndpointName="async-realtime", InputLocation=f"s3://{bucket}/x")
    missing = httpx.get(f"{daemon.url}/sdmaker/v1/jobs/no-such-job")
    assert missing.status_code == 404 and missing.json()["error"] == "JobNotFoundError"
    assert httpx.post(f"{daemon.url}/sdmaker/v1/jobs/no-such-job/cancel").status_code == 404
    assert httpx.get(f"{daemon.url}/sdmaker/v1/jobs", params={"state": "bogus"}).status_code == 400
    sm = daemon.boto("sagemaker")
    with pytest.raises(sm.exceptions.ClientError, match="s3OutputPath"):
        sm.create_endpoint_config(EndpointConfigName="async-bad", AsyncInferenceConfig={"OutputConfig": {}},
                                  ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": f"{echo_endpoint}-m",
                                                       "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}])


def test_client_and_cli(daemon: Any, echo_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdmaker.cli import app
    from sdmaker.client import Client
    from sdmaker.errors import JobNotFoundError

    monkeypatch.setenv("SDMAKER_HOME", str(tmp_path))
    monkeypatch.setenv("SDMAKER_URL", daemon.url)
    with Client(daemon.url) as client:
        answer = client.invoke_async(echo_endpoint, {"via": "client"}, inference_id="client-job")
        assert answer["InferenceId"] == "client-job"
        assert client.wait_job("client-job", timeout_s=120)["state"] == "succeeded"
        assert any(j["id"] == "client-job" for j in client.jobs(endpoint=echo_endpoint))
        with pytest.raises(JobNotFoundError):
            client.job("nope-nope")
    runner = CliRunner()
    shown = runner.invoke(app, ["jobs", "show", "client-job"])
    assert shown.exit_code == 0 and "succeeded" in shown.output
    waited = runner.invoke(app, ["jobs", "wait", "client-job"])
    assert waited.exit_code == 0 and "client-job.out" in waited.output
    listed = runner.invoke(app, ["jobs", "list", "--endpoint", echo_endpoint, "--json"])
    assert listed.exit_code == 0 and "client-job" in listed.output
    assert runner.invoke(app, ["jobs", "show", "nope-nope"]).exit_code == 1


@pytest.mark.slow
def test_sagemaker_sdk_async_flow_runs_unchanged(daemon: Any, moto_server: str, seed_model_dir: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HuggingFaceModel.deploy(async_inference_config=...)``, ``predict_async`` + ``get_result`` and
    ``predict`` on the AsyncPredictor, as the SDK documents them; only the environment points at sdmaker."""
    import base64
    import contextlib
    import io
    import tarfile

    import sagemaker.session
    from PIL import Image
    from test_sdk import _sdmaker_env

    bucket = "sdmaker-seed"
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for item in sorted(seed_model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    s3 = s3_client(moto_server)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(archive), bucket, "async/model.tar.gz")
    for key, value in _sdmaker_env(daemon.url, tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    real_sleep = time.sleep

    class _FastTime:  # the SDK sleeps 30 s between DescribeEndpoint polls (see test_sdk.py)
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            real_sleep(min(seconds, 0.5))

    monkeypatch.setattr(sagemaker.session, "time", _FastTime())

    # ---- the SDK's asynchronous inference flow, as documented -----------------------------------------
    from sagemaker.async_inference import AsyncInferenceConfig, WaiterConfig
    from sagemaker.huggingface.model import HuggingFaceModel

    huggingface_model = HuggingFaceModel(model_data=f"s3://{bucket}/async/model.tar.gz",
                                         role="arn:aws:iam::111122223333:role/sm", transformers_version="4.26",
                                         pytorch_version="1.13", py_version="py39")
    predictor = huggingface_model.deploy(
        initial_instance_count=1, instance_type="ml.g4dn.xlarge", endpoint_name="sdk-async-endpoint",
        async_inference_config=AsyncInferenceConfig(output_path=f"s3://{bucket}/async-out"))
    data = {"prompt": "A bird is flying in space", "height": 64, "width": 64, "num_inference_steps": 2}
    response = predictor.predict_async(data=data)
    result = response.get_result(WaiterConfig(max_attempts=300, delay=1))
    direct = predictor.predict(data)
    predictor.delete_endpoint()
    # ------------------------------------------------------------------------------------------------------

    assert response.output_path.startswith(f"s3://{bucket}/async-out/")
    for answer in (result, direct):
        image = Image.open(io.BytesIO(base64.b64decode(answer["generated_images"][0])))
        assert (image.format, image.size) == ("JPEG", (64, 64))
