"""The seed article's steps 7-9 with the SageMaker Python SDK 2.x, only the environment pointed at sdmaker.

Two flows: against sdmaker alone (``sdmaker up`` serves the SageMaker APIs *and* S3; ``sdmaker env``
exports ``AWS_ENDPOINT_URL_S3`` for its built-in S3, the model goes up with ``S3Uploader.upload``), and
once against a third-party S3 (a moto server, what the user's own ``AWS_ENDPOINT_URL_S3`` names) with the
shared ``daemon`` fixture. ``sdmaker env`` provides every other export (including the SDK config file
with ``DefaultS3Bucket``, which spares the SDK its STS call).
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import pytest
from PIL import Image

BUCKET = "sdmaker-seed"


def _sdmaker_env(daemon_url: str, home: Path) -> dict[str, str]:
    """Run ``eval "$(sdmaker env)"`` in bash and return the resulting exports."""
    script = f'eval "$({sys.executable} -m sdmaker env --bucket {BUCKET} --url {daemon_url})" && env -0'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=120, check=True,
                          env={"PATH": "/usr/bin:/bin", "SDMAKER_HOME": str(home), "HOME": str(home)})
    pairs = [item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item]
    return {k: v for k, v in pairs if k.startswith(("AWS_", "SAGEMAKER_"))}


def _upload_model_tar(model_dir: Path, moto_url: str, tmp_path: Path) -> str:
    """The seed's step 7: tar the folder (files at the archive root) and upload it."""
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for item in sorted(model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(archive), BUCKET, "sd/model.tar.gz")
    return f"s3://{BUCKET}/sd/model.tar.gz"


def _fast_sdk_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK sleeps 30 s before its first DescribeEndpoint and between polls (session.py `_wait_until`,
    DEFAULT_EP_POLL = 30). The endpoint is InService within seconds, so shorten those sleeps for these
    tests only; the seed's code is untouched."""
    import sagemaker.session

    real_sleep = time.sleep

    class _FastTime:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            real_sleep(min(seconds, 0.5))

    monkeypatch.setattr(sagemaker.session, "time", _FastTime())


def _seed_steps_8_and_9(s3_model_uri: str, endpoint_name: str) -> list[Image.Image]:
    """The seed's steps 8-9, as written there."""
    from sagemaker.huggingface.model import HuggingFaceModel

    role = "arn:aws:iam::111122223333:role/sm"
    huggingface_model = HuggingFaceModel(
        model_data=s3_model_uri,
        role=role,
        transformers_version="4.26",
        pytorch_version="1.13",
        py_version="py39",
    )
    predictor = huggingface_model.deploy(
        initial_instance_count=1,
        instance_type="ml.g4dn.xlarge",
        endpoint_name=endpoint_name,
    )
    data = {
        "prompt": ["A bird is flying in space", "Photos of horseback riding under the sea"],
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "num_images_per_prompt": 1,
    }
    res = predictor.predict(data=data)
    images = [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in res["generated_images"]]
    predictor.delete_endpoint()
    return images


@pytest.fixture(scope="module")
def sdmaker_only(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A daemon with no S3 of the user's own configured: it serves S3 itself (and reads model data from it)."""
    from conftest import start_builtin_s3_daemon

    d = start_builtin_s3_daemon(tmp_path_factory.mktemp("sdmaker-only-home"))
    yield d
    d.stop()


@pytest.mark.slow
def test_seed_notebook_runs_against_sdmaker_alone(sdmaker_only, seed_model_dir, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The seed's notebook (S3Uploader.upload, deploy, predict), then the SDK's async and batch-transform flows,
    against one `sdmaker up` and nothing else: its own S3 holds the model, the inputs and the results."""
    exports = _sdmaker_env(sdmaker_only.url, tmp_path)
    assert exports["AWS_ENDPOINT_URL_S3"] == sdmaker_only.url + "/s3"
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in exports.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    _fast_sdk_polls(monkeypatch)
    archive = tmp_path / "model.tar.gz"  # the seed's step 7: files at the archive root
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for item in sorted(seed_model_dir.iterdir()):
            tar.add(item, arcname=item.name)

    # ---- the seed's upload, then steps 8-9 ----------------------------------------------------------------
    import sagemaker
    from sagemaker.s3 import S3Uploader

    sess = sagemaker.Session()
    s3_model_uri = S3Uploader.upload(local_path=str(archive), desired_s3_uri=f"s3://{sess.default_bucket()}/sd",
                                     sagemaker_session=sess)
    images = _seed_steps_8_and_9(s3_model_uri, "sdk-own-s3-endpoint")
    # ------------------------------------------------------------------------------------------------------

    assert s3_model_uri == f"s3://{BUCKET}/sd/model.tar.gz"
    assert [(im.format, im.size) for im in images] == [("JPEG", (64, 64))] * 2
    blob = sdmaker_only.home / "s3" / "blobs"  # the archive is in the daemon's own S3, nowhere else
    assert any(p.stat().st_size == archive.stat().st_size for p in blob.iterdir())

    # ---- the SDK's asynchronous inference and batch transform flows, on the same daemon and its S3 ---------
    import json

    from sagemaker.async_inference import AsyncInferenceConfig, WaiterConfig
    from sagemaker.huggingface.model import HuggingFaceModel

    _fast_sdk_clock(monkeypatch)  # transform's log tailing waits on the clock, not only on sleeps
    model = HuggingFaceModel(model_data=s3_model_uri, role="arn:aws:iam::111122223333:role/sm",
                             transformers_version="4.26", pytorch_version="1.13", py_version="py39")
    predictor = model.deploy(initial_instance_count=1, instance_type="ml.m5.xlarge", endpoint_name="sdk-own-s3-async",
                             async_inference_config=AsyncInferenceConfig(output_path=f"s3://{BUCKET}/async-out"))
    data = {"prompt": "A bird is flying in space", "height": 64, "width": 64, "num_inference_steps": 2}
    result = predictor.predict_async(data=data).get_result(WaiterConfig(max_attempts=300, delay=1))
    predictor.delete_endpoint()
    s3 = boto3.client("s3")  # the environment `sdmaker env` exported: the daemon's own S3
    s3.put_object(Bucket=BUCKET, Key="batch/prompts.jsonl", Body="".join(
        json.dumps({"prompt": f"a red circle number {i}", "height": 64, "width": 64, "num_inference_steps": 2,
                    "seed": 100 + i}) + "\n" for i in range(3)).encode())
    transformer = model.transformer(instance_count=1, instance_type="ml.m5.xlarge",
                                    output_path=f"s3://{BUCKET}/batch-out", assemble_with="Line",
                                    accept="application/json")
    transformer.transform(data=f"s3://{BUCKET}/batch/prompts.jsonl", content_type="application/json",
                          split_type="Line")
    transformer.wait()
    # ------------------------------------------------------------------------------------------------------

    image = Image.open(io.BytesIO(base64.b64decode(result["generated_images"][0])))
    assert (image.format, image.size) == ("JPEG", (64, 64))
    out = s3.get_object(Bucket=BUCKET, Key="batch-out/prompts.jsonl.out")["Body"].read().decode().splitlines()
    assert len(out) == 3  # one answer per record, in order; the seed's handler answers with the image alone
    for line in out:
        image = Image.open(io.BytesIO(base64.b64decode(json.loads(line)["generated_images"][0])))
        assert image.size == (64, 64)


def _fast_sdk_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like :func:`_fast_sdk_polls`, and the SDK's clock moves on by the time a sleep skipped (its log tailing
    while a transform job runs describes the job every 30 s of *clock* time)."""
    import sagemaker.session

    real_sleep, skipped = time.sleep, [0.0]

    class _FastTime:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            real_sleep(min(seconds, 0.3))
            skipped[0] += max(0.0, seconds - 0.3)

        @staticmethod
        def time() -> float:
            return time.time() + skipped[0]

    monkeypatch.setattr(sagemaker.session, "time", _FastTime())


@pytest.mark.slow
def test_seed_steps_8_and_9_run_unchanged(daemon, moto_server, seed_model_dir, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s3_model_uri = _upload_model_tar(seed_model_dir, moto_server, tmp_path)
    exports = _sdmaker_env(daemon.url, tmp_path)
    assert exports["AWS_ENDPOINT_URL_SAGEMAKER"] == exports["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] == daemon.url
    assert f"DefaultS3Bucket: {BUCKET}" in Path(exports["SAGEMAKER_USER_CONFIG_OVERRIDE"]).read_text()
    for key, value in exports.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)  # the user's own S3 configuration
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

    _fast_sdk_polls(monkeypatch)
    images = _seed_steps_8_and_9(s3_model_uri, "sdk-seed-endpoint")

    assert [(im.format, im.size) for im in images] == [("JPEG", (64, 64))] * 2
    sm = daemon.boto("sagemaker")
    with pytest.raises(sm.exceptions.ClientError, match="Could not find endpoint"):
        sm.describe_endpoint(EndpointName="sdk-seed-endpoint")
    with pytest.raises(sm.exceptions.ClientError, match="Could not find endpoint configuration"):
        sm.describe_endpoint_config(EndpointConfigName="sdk-seed-endpoint")
