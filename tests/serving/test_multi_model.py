"""Multi-model endpoints (issue 16): ``Mode: MultiModel`` + ``TargetModel``, an LRU of loaded models bounded by
memory, ``ModelNotReadyException`` while a model loads, the MME metrics, and the SDK's ``MultiDataModel``.

The boto3 tests and one SDK test use the shared ``daemon`` (its S3 is a moto server); the other SDK test uses
this module's own daemon with no S3 configured, so the model artifacts live in sdmaker's built-in S3.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

ROLE = "arn:aws:iam::111122223333:role/sm"


def _tar(folder: Path, out: Path) -> Path:
    """A SageMaker artifact: the folder's files at the archive root."""
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        for item in sorted(folder.iterdir()):
            tar.add(item, arcname=item.name)
    return out


def _s3(url: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _deploy_mme(daemon, name: str, prefix: str, env: dict[str, str], **container: object) -> None:  # type: ignore[no-untyped-def]
    sm = daemon.boto("sagemaker")
    sm.create_model(ModelName=name, ExecutionRoleArn=ROLE, PrimaryContainer={
        "Image": "sdmaker", "Mode": "MultiModel", "ModelDataUrl": prefix, "Environment": env, **container})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sm.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 0.5, "MaxAttempts": 240})


def _echo(rt, endpoint: str, target: str | None, **body: object) -> dict:  # type: ignore[no-untyped-def]
    kwargs = {"TargetModel": target} if target is not None else {}
    reply = rt.invoke_endpoint(EndpointName=endpoint, Body=json.dumps(body), ContentType="application/json",
                               Accept="application/json", **kwargs)
    return json.loads(reply["Body"].read())


def _metric(text: str, name: str, endpoint: str, extra: str = "") -> float:
    pattern = rf'^{name}\{{endpoint="{endpoint}"{extra}\}} (\S+)$'
    found = re.search(pattern, text, re.M)
    assert found, f"{name} for {endpoint} not in /metrics"
    return float(found.group(1))


@pytest.fixture(scope="module")
def mme_prefix(daemon, moto_server, scripted_model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Three code-only models under one moto S3 prefix (a, sub/b, c) and the memory one of them costs."""
    from sdmaker.serving.daemon._admission import worker_memory_floor

    bucket = f"mme-{uuid.uuid4().hex[:8]}"
    s3 = _s3(moto_server)
    s3.create_bucket(Bucket=bucket)
    archive = _tar(scripted_model_dir, tmp_path_factory.mktemp("mme") / "model.tar.gz")
    for key in ("a.tar.gz", "sub/b.tar.gz", "c.tar.gz"):
        s3.upload_file(str(archive), bucket, f"models/{key}")
    return f"s3://{bucket}/models/", worker_memory_floor(scripted_model_dir, "auto")


def test_target_models_load_on_first_use_into_an_lru_bounded_by_memory(daemon, mme_prefix, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prefix, floor = mme_prefix
    budget_mb = int(2.5 * floor / 2**20)  # two loaded models fit, a third evicts the least recently used
    _deploy_mme(daemon, "mme-lru", prefix, {"SDMAKER_MME_MEMORY_MB": str(budget_mb), "SDMAKER_MME_LOAD_WAIT": "300",
                                            "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "90"})
    sm, rt = daemon.boto("sagemaker"), daemon.boto("sagemaker-runtime")
    container = sm.describe_model(ModelName="mme-lru")["PrimaryContainer"]
    assert (container["Mode"], container["ModelDataUrl"]) == ("MultiModel", prefix)

    a = _echo(rt, "mme-lru", "a.tar.gz", n=1)
    assert a["echo"] == {"n": 1}
    assert _echo(rt, "mme-lru", "a.tar.gz", n=2)["pid"] == a["pid"]  # a warm hit: the same worker
    b = _echo(rt, "mme-lru", "sub/b.tar.gz")
    assert b["pid"] != a["pid"]  # one worker process per target model
    c = _echo(rt, "mme-lru", "c.tar.gz")  # no room for a third: a (least recently used) is unloaded
    assert _echo(rt, "mme-lru", "sub/b.tar.gz")["pid"] == b["pid"]
    assert _echo(rt, "mme-lru", "c.tar.gz")["pid"] == c["pid"]
    assert _echo(rt, "mme-lru", "a.tar.gz")["pid"] not in (a["pid"], b["pid"], c["pid"])  # loaded again

    described = httpx.get(f"{daemon.url}/sdmaker/v1/endpoints/mme-lru", timeout=10).json()
    assert described["timeout_s"] == 90  # the model's Environment sets the endpoint's limits, as for one model
    details = described["multi_model"]
    assert [m["target_model"] for m in details["models"]] == ["a.tar.gz", "c.tar.gz"]  # b was evicted for a
    from typer.testing import CliRunner

    from sdmaker.cli import app

    monkeypatch.setenv("SDMAKER_URL", daemon.url)
    shown = CliRunner().invoke(app, ["endpoint", "describe", "mme-lru"])
    assert shown.exit_code == 0, shown.output
    assert "cache hits 3 / misses 4" in shown.output and "a.tar.gz" in shown.output
    text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    assert _metric(text, "sdmaker_mme_model_cache_lookups_total", "mme-lru", ',result="hit"') == 3
    assert _metric(text, "sdmaker_mme_model_cache_lookups_total", "mme-lru", ',result="miss"') == 4
    assert _metric(text, "sdmaker_mme_loaded_model_count", "mme-lru") == 2
    assert _metric(text, "sdmaker_mme_model_unloading_seconds_count", "mme-lru") == 2
    assert _metric(text, "sdmaker_mme_model_loading_seconds_count", "mme-lru") == 4
    assert _metric(text, "sdmaker_mme_model_loading_wait_seconds_count", "mme-lru") == 4

    # errors, in AWS's shapes
    for target, match in ((None, "needs TargetModel"), ("../a.tar.gz", "relative path"),
                          ("/abs.tar.gz", "relative path"), ("sub//b.tar.gz", "relative path"),
                          ("missing.tar.gz", r"Failed to download model data\(bucket: .*key: models/missing.tar.gz\)")):
        with pytest.raises(ClientError, match=match) as info:
            _echo(rt, "mme-lru", target)
        assert (info.value.response["Error"]["Code"], info.value.response["ResponseMetadata"]["HTTPStatusCode"]) == (
            "ValidationError", 400)
    sm.delete_endpoint(EndpointName="mme-lru")


def test_a_loading_model_answers_model_not_ready_then_serves(daemon, mme_prefix, scripted_model_dir) -> None:  # type: ignore[no-untyped-def]
    prefix, _ = mme_prefix
    _deploy_mme(daemon, "mme-slow", prefix, {"SCRIPTED_LOAD_SECONDS": "4", "SDMAKER_MME_LOAD_WAIT": "0.2"})
    rt = daemon.boto("sagemaker-runtime")
    with pytest.raises(rt.exceptions.ModelNotReadyException) as info:
        _echo(rt, "mme-slow", "a.tar.gz")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert "still loading" in info.value.response["Error"]["Message"]
    for _ in range(240):  # the load went on: a retry finds the model loaded
        try:
            assert _echo(rt, "mme-slow", "a.tar.gz", ok=1)["echo"] == {"ok": 1}
            break
        except rt.exceptions.ModelNotReadyException:
            time.sleep(0.25)
    else:
        pytest.fail("the model never finished loading")
    daemon.boto("sagemaker").delete_endpoint(EndpointName="mme-slow")

    # ModelCacheSetting Disabled: each model is unloaded once its requests are answered
    _deploy_mme(daemon, "mme-nocache", prefix, {"SDMAKER_MME_LOAD_WAIT": "300"},
                MultiModelConfig={"ModelCacheSetting": "Disabled"})
    first = _echo(rt, "mme-nocache", "a.tar.gz")["pid"]
    for _ in range(240):
        text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
        if _metric(text, "sdmaker_mme_model_unloading_seconds_count", "mme-nocache") == 1:
            break
        time.sleep(0.25)
    assert _metric(text, "sdmaker_mme_loaded_model_count", "mme-nocache") == 0
    assert _echo(rt, "mme-nocache", "a.tar.gz")["pid"] != first
    daemon.boto("sagemaker").delete_endpoint(EndpointName="mme-nocache")

    # a TargetModel on a single-model endpoint is refused, as AWS does
    daemon.deploy("single-target", scripted_model_dir)
    with pytest.raises(ClientError, match="is not a multi-model endpoint and does not support target model header"):
        _echo(rt, "single-target", "a.tar.gz")
    daemon.boto("sagemaker").delete_endpoint(EndpointName="single-target")


@pytest.fixture(scope="module")
def builtin_s3_daemon(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A daemon with no S3 of the user's own: model artifacts go to (and load from) its built-in S3."""
    from conftest import start_builtin_s3_daemon

    d = start_builtin_s3_daemon(tmp_path_factory.mktemp("mme-home"))
    yield d
    d.stop()


def _multi_data_model_flow(with_sd: bool, sd1_dir: Path, scripted_model_dir: Path, tmp_path: Path) -> dict:
    """The SageMaker SDK's MultiDataModel flow, unchanged (deploy, add_model from a file and from S3,
    list_models, predict(target_model=...)); the environment already points the SDK at sdmaker."""
    import sagemaker
    from sagemaker.huggingface.model import HuggingFaceModel
    from sagemaker.multidatamodel import MultiDataModel
    from sagemaker.s3 import S3Uploader

    echo_archive = _tar(scripted_model_dir, tmp_path / "echo.tar.gz")
    sess = sagemaker.Session()
    bucket = sess.default_bucket()
    staged = S3Uploader.upload(local_path=str(echo_archive), desired_s3_uri=f"s3://{bucket}/staging",
                               sagemaker_session=sess)
    model = HuggingFaceModel(role=ROLE, transformers_version="4.26", pytorch_version="1.13", py_version="py39",
                             sagemaker_session=sess, env={"SDMAKER_MME_LOAD_WAIT": "300"})  # a loaded test machine
    mme = MultiDataModel(name="sdk-mme", model_data_prefix=f"s3://{bucket}/mme/", model=model,
                         sagemaker_session=sess)
    predictor = mme.deploy(initial_instance_count=1, instance_type="ml.m5.xlarge", endpoint_name="sdk-mme")
    out: dict = {"bucket": bucket}
    if with_sd:
        mme.add_model(model_data_source=str(_tar(sd1_dir, tmp_path / "sd.tar.gz")), model_data_path="sd.tar.gz")
    mme.add_model(model_data_source=staged, model_data_path="tools/echo.tar.gz")
    out["listed"] = sorted(mme.list_models())
    if with_sd:
        data = {"inputs": "a red circle on the left", "parameters": {"height": 64, "width": 64,
                                                                      "num_inference_steps": 2, "seed": 3}}
        out["images"] = [predictor.predict(data, target_model="sd.tar.gz")["generated_images"] for _ in range(2)]
    out["echoed"] = [predictor.predict({"hello": i}, target_model="tools/echo.tar.gz") for i in range(2)]
    out["metrics"] = httpx.get(f"{os.environ['AWS_ENDPOINT_URL_SAGEMAKER']}/metrics", timeout=10).text
    predictor.delete_endpoint()
    return out


def _point_the_sdk_at(daemon_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_url: str | None) -> None:
    from test_sdk import _fast_sdk_polls, _sdmaker_env

    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in _sdmaker_env(daemon_url, tmp_path).items():
        monkeypatch.setenv(key, value)
    if s3_url is not None:  # the user's own S3
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    _fast_sdk_polls(monkeypatch)


@pytest.mark.slow
def test_sdk_multi_data_model_runs_unchanged_with_moto_s3(daemon, moto_server, sd1_dir, scripted_model_dir,
                                                          tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _point_the_sdk_at(daemon.url, tmp_path, monkeypatch, moto_server)
    out = _multi_data_model_flow(True, sd1_dir, scripted_model_dir, tmp_path)
    assert out["listed"] == ["sd.tar.gz", "tools/echo.tar.gz"]
    first, again = out["images"]
    assert first == again and len(first) == 1  # same seed, same image: the second request was a warm hit
    assert [e["echo"] for e in out["echoed"]] == [{"hello": 0}, {"hello": 1}]
    assert out["echoed"][0]["pid"] == out["echoed"][1]["pid"]
    assert _metric(out["metrics"], "sdmaker_mme_model_cache_lookups_total", "sdk-mme", ',result="hit"') == 2
    assert _metric(out["metrics"], "sdmaker_mme_loaded_model_count", "sdk-mme") == 2
    desc = daemon.boto("sagemaker").describe_model(ModelName="sdk-mme")["PrimaryContainer"]
    assert (desc["Mode"], desc["ModelDataUrl"]) == ("MultiModel", f"s3://{out['bucket']}/mme/")
    assert _s3(moto_server).head_object(Bucket=out["bucket"], Key="mme/sd.tar.gz")["ContentLength"] > 0


@pytest.mark.slow
def test_sdk_multi_data_model_runs_unchanged_on_the_builtin_s3(builtin_s3_daemon, sd1_dir, scripted_model_dir,
                                                               tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The same flow against one `sdmaker up` and nothing else: its own S3 holds the artifacts."""
    _point_the_sdk_at(builtin_s3_daemon.url, tmp_path, monkeypatch, None)
    out = _multi_data_model_flow(False, sd1_dir, scripted_model_dir, tmp_path)
    assert out["listed"] == ["tools/echo.tar.gz"]
    assert [e["echo"] for e in out["echoed"]] == [{"hello": 0}, {"hello": 1}]
    assert _metric(out["metrics"], "sdmaker_mme_model_cache_lookups_total", "sdk-mme", ',result="hit"') == 1
    assert any((builtin_s3_daemon.home / "s3").rglob("*"))  # the artifacts went to the daemon's own S3


@pytest.mark.parametrize("target", ["a.tar.gz", "sub/dir/b.tar.gz", "v1.2/model-x_y.tar.gz"])
def test_target_model_paths_that_are_accepted(target: str) -> None:
    from sdmaker.serving.daemon._multi_model import check_target_model

    assert check_target_model(target, "e") == target


@pytest.mark.parametrize("target", [None, "", "../a.tar.gz", "sub/../../a.tar.gz", "/etc/passwd", "./a.tar.gz",
                                    "sub//a.tar.gz", "a\\..\\b.tar.gz", "a\x00.tar.gz", "é.tar.gz", "x" * 1025])
def test_target_model_paths_that_are_refused(target: str | None) -> None:
    from sdmaker.errors import InvalidRequestError
    from sdmaker.serving.daemon._multi_model import check_target_model

    with pytest.raises(InvalidRequestError) as info:
        check_target_model(target, "e")
    assert info.value.fields["field"] == "TargetModel" and info.value.http_status == 400


def test_targets_resolve_under_an_s3_a_folder_or_a_store_name_prefix(tmp_path: Path) -> None:
    from sdmaker.config import load_settings
    from sdmaker.serving.daemon._multi_model import MultiModelPool

    def ref(prefix: str, target: str) -> str:
        pool = MultiModelPool(endpoint="e", prefix=prefix, variant={"ModelName": "m"}, model={"PrimaryContainer": {}},
                              settings=load_settings({"SDMAKER_HOME": str(tmp_path)}), run_dir=tmp_path,
                              log=lambda _: None, log_file=tmp_path / "log")
        return pool._ref(target)

    assert ref("s3://b/models/", "x/a.tar.gz") == "s3://b/models/x/a.tar.gz"
    assert ref("s3://b/models", "a.tar.gz") == "s3://b/models/a.tar.gz"
    assert ref(str(tmp_path), "a.tar.gz") == str(tmp_path / "a.tar.gz")
    assert ref("team-", "sd") == "team-sd"  # a store-name prefix
