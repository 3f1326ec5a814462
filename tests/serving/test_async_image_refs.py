"""Image references on a real daemon (issue 16): an asynchronous image-to-image request whose ``image`` is an
``s3://`` object in the daemon's built-in S3 (or a URL on an allowed host) gives the very image the same request
with the image inline gives; a missing object or a refused URL fails the job naming the field; a synchronous
InvokeEndpoint refuses references with a 400; a batch transform record may reference its image too.

One daemon (built-in S3, ``SDMAKER_IMAGE_URL_HOSTS`` = a local http.server) and one ``mini`` endpoint at 64x64."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image, ImageDraw

from sdmaker.engine import read_recipe
from sdmaker.models import is_builtin_ready

pytestmark = pytest.mark.skipif(not is_builtin_ready("mini"), reason="mini weights not committed in this checkout")

ROLE = "arn:aws:iam::111122223333:role/sm"
BUCKET = "refs"
ENDPOINT = "refs-mini"


def _source_png() -> bytes:
    """A red circle on the left, on white: the kind of picture ``mini`` draws."""
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((6, 20, 30, 44), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


SOURCE = _source_png()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("served")
    (root / "src.png").write_bytes(SOURCE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def refs_daemon(tmp_path_factory: pytest.TempPathFactory, http_port: int):  # type: ignore[no-untyped-def]
    from conftest import start_builtin_s3_daemon

    d = start_builtin_s3_daemon(tmp_path_factory.mktemp("refs-home"),
                                env={"SDMAKER_IMAGE_URL_HOSTS": f"127.0.0.1:{http_port}"})
    try:
        s3 = _s3(d)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="in/src.png", Body=SOURCE, ContentType="image/png")
        sm = d.boto("sagemaker")
        sm.create_model(ModelName=f"{ENDPOINT}-m", ExecutionRoleArn=ROLE, PrimaryContainer={
            "Image": "sdmaker", "ModelDataUrl": "mini",
            "Environment": {"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "600"}})
        sm.create_endpoint_config(
            EndpointConfigName=f"{ENDPOINT}-c",
            AsyncInferenceConfig={"OutputConfig": {"S3OutputPath": f"s3://{BUCKET}/out",
                                                   "S3FailurePath": f"s3://{BUCKET}/failed"}},
            ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": f"{ENDPOINT}-m",
                                 "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}])
        sm.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName=f"{ENDPOINT}-c")
        sm.get_waiter("endpoint_in_service").wait(EndpointName=ENDPOINT,
                                                  WaiterConfig={"Delay": 0.5, "MaxAttempts": 600})
        yield d
    finally:
        d.stop()


def _s3(d: Any) -> Any:
    return boto3.client("s3", endpoint_url=d.url + "/s3", region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _request(image: str) -> dict[str, Any]:
    return {"prompt": "a blue circle on the left", "image": image, "strength": 0.5, "num_inference_steps": 4,
            "seed": 11, "format": "png"}


def _submit(d: Any, body: dict[str, Any]) -> dict[str, Any]:
    rt = d.boto("sagemaker-runtime")
    return dict(rt.invoke_endpoint_async(EndpointName=ENDPOINT, Body=json.dumps(body).encode(),
                                         ContentType="application/json", InferenceId=f"j-{uuid.uuid4().hex[:12]}"))


def _wait(d: Any, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = dict(httpx.get(f"{d.url}/sdmaker/v1/jobs/{job_id}", timeout=30).json())
        if info["state"] in ("succeeded", "failed", "expired", "cancelled"):
            return info
        assert time.monotonic() < deadline, f"job {job_id} still {info['state']}"
        time.sleep(0.2)


def _read(d: Any, uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return bytes(_s3(d).get_object(Bucket=bucket, Key=key)["Body"].read())


def _image_of(d: Any, answer: dict[str, Any]) -> bytes:
    """The one PNG of a succeeded job's output."""
    info = _wait(d, answer["InferenceId"])
    assert info["state"] == "succeeded", info
    images = json.loads(_read(d, answer["OutputLocation"]))["generated_images"]
    assert len(images) == 1
    return base64.b64decode(images[0])


def _failure(d: Any, answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    info = _wait(d, answer["InferenceId"])
    assert info["state"] == "failed", info
    return info, json.loads(_read(d, answer["FailureLocation"]))


def test_an_s3_or_url_reference_gives_the_image_the_inline_image_gives(refs_daemon: Any, http_port: int) -> None:
    # one at a time: each job runs alone, as the inline one did (requests that share a step batch may differ
    # in the last bf16 bit, which is about batching, not references)
    expected = _image_of(refs_daemon, _submit(refs_daemon, _request(base64.b64encode(SOURCE).decode())))
    by_s3 = _image_of(refs_daemon, _submit(refs_daemon, _request(f"s3://{BUCKET}/in/src.png")))
    by_url = _image_of(refs_daemon, _submit(refs_daemon, _request(f"http://127.0.0.1:{http_port}/src.png")))
    assert by_s3 == expected  # same pixels, same recipe: byte for byte
    assert by_url == expected
    with Image.open(io.BytesIO(expected)) as img:
        assert img.size == (64, 64)
    recipe = read_recipe(expected)
    assert recipe["inputs"]["image_sha256"] == hashlib.sha256(SOURCE).hexdigest()
    assert recipe["request"]["strength"] == 0.5


def test_a_missing_object_or_a_refused_url_fails_the_job_naming_the_field(refs_daemon: Any) -> None:
    missing = _submit(refs_daemon, _request(f"s3://{BUCKET}/in/nope.png"))
    masked = _submit(refs_daemon, {**_request(base64.b64encode(SOURCE).decode()),
                                   "mask_image": "http://169.254.169.254/latest/meta-data/"})
    info, failure = _failure(refs_daemon, missing)
    assert failure["ErrorCode"] == "ValidationError" and failure["OriginalStatusCode"] == 400
    assert failure["Message"].startswith("image") and "no such object" in failure["Message"]
    assert "image" in info["failure_reason"]
    info, failure = _failure(refs_daemon, masked)
    assert failure["Message"].startswith("mask_image") and "SDMAKER_IMAGE_URL_HOSTS" in failure["Message"]
    assert "SDMAKER_IMAGE_URL_HOSTS" in info["failure_reason"]


def test_synchronous_invoke_refuses_references(refs_daemon: Any) -> None:
    from botocore.exceptions import ClientError

    rt = refs_daemon.boto("sagemaker-runtime")
    with pytest.raises(ClientError) as err:
        rt.invoke_endpoint(EndpointName=ENDPOINT, ContentType="application/json",
                           Body=json.dumps(_request(f"s3://{BUCKET}/in/src.png")).encode())
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message = err.value.response["Error"]["Message"]
    assert message.startswith("image") and "InvokeEndpointAsync" in message and "transform" in message


def test_a_transform_record_may_reference_its_image(refs_daemon: Any) -> None:
    s3, sm = _s3(refs_daemon), refs_daemon.boto("sagemaker")
    good = {**_request(f"s3://{BUCKET}/in/src.png"), "format": "jpeg"}
    s3.put_object(Bucket=BUCKET, Key="batch/a.jsonl", Body=json.dumps(good).encode() + b"\n")
    s3.put_object(Bucket=BUCKET, Key="batch/b.jsonl",
                  Body=json.dumps({**good, "image": f"s3://{BUCKET}/in/gone.png"}).encode() + b"\n")
    name = f"refs-{uuid.uuid4().hex[:8]}"
    sm.create_transform_job(
        TransformJobName=name, ModelName=f"{ENDPOINT}-m",
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/batch/"}},
                        "ContentType": "application/json", "SplitType": "Line"},
        TransformOutput={"S3OutputPath": f"s3://{BUCKET}/batch-out", "AssembleWith": "Line",
                         "Accept": "application/json"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1})
    deadline = time.monotonic() + 300
    while (desc := sm.describe_transform_job(TransformJobName=name))["TransformJobStatus"] == "InProgress":
        assert time.monotonic() < deadline, desc
        time.sleep(0.3)
    # the record with a missing image fails its file, named; the other file is done
    assert desc["TransformJobStatus"] == "Failed", desc
    assert "b.jsonl" in desc["FailureReason"] and "image" in desc["FailureReason"]
    assert "no such object" in desc["FailureReason"]
    out = json.loads(_read(refs_daemon, f"s3://{BUCKET}/batch-out/a.jsonl.out"))
    inline = _submit(refs_daemon, {**good, "image": base64.b64encode(SOURCE).decode()})
    assert _wait(refs_daemon, inline["InferenceId"])["state"] == "succeeded"
    assert out["generated_images"] == json.loads(_read(refs_daemon, inline["OutputLocation"]))["generated_images"]
