"""The seed article's steps 8-9 with the SageMaker Python SDK 2.x, only the environment pointed at sdmaker.

S3 is a moto server (what ``AWS_ENDPOINT_URL_S3`` names), the SageMaker APIs are the shared ``daemon``
fixture, and ``sdmaker env`` provides every other export (including the SDK config file with
``DefaultS3Bucket``, which spares the SDK its STS call).
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

    import sagemaker.session

    # The SDK sleeps 30 s before its first DescribeEndpoint and between polls (session.py `_wait_until`,
    # DEFAULT_EP_POLL = 30). The endpoint is InService within seconds, so shorten those sleeps for this
    # test only; the seed's code below is untouched.
    real_sleep = time.sleep

    class _FastTime:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            real_sleep(min(seconds, 0.5))

    monkeypatch.setattr(sagemaker.session, "time", _FastTime())

    # ---- the seed's steps 8-9, as written there -------------------------------------------------------
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
        endpoint_name="sdk-seed-endpoint",
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
    # ------------------------------------------------------------------------------------------------------

    assert [(im.format, im.size) for im in images] == [("JPEG", (64, 64))] * 2
    sm = daemon.boto("sagemaker")
    with pytest.raises(sm.exceptions.ClientError, match="Could not find endpoint"):
        sm.describe_endpoint(EndpointName="sdk-seed-endpoint")
    with pytest.raises(sm.exceptions.ClientError, match="Could not find endpoint configuration"):
        sm.describe_endpoint_config(EndpointConfigName="sdk-seed-endpoint")
