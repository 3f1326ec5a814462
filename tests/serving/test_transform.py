"""Batch transform (issue 13): CreateTransformJob / DescribeTransformJob / ListTransformJobs / StopTransformJob
through boto3 and the SageMaker SDK, against the shared daemon and a moto S3 server (as real S3).

Most jobs run the scripted model (tests/conftest.py: each record chooses to echo, sleep or fail), so what is
tested is the job machinery, not image generation; the SDK test runs the built-in ``mini`` on 64x64 images.
"""

from __future__ import annotations

import gzip
import json
import time
import uuid
from typing import Any

import boto3
import pytest

ROLE = "arn:aws:iam::111122223333:role/sm"


@pytest.fixture(scope="module")
def s3(moto_server: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    name = f"transform-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def sm(daemon: Any) -> Any:
    return daemon.boto("sagemaker")


@pytest.fixture(scope="module")
def scripted_model(sm: Any, scripted_model_dir: Any) -> str:
    name = f"scripted-{uuid.uuid4().hex[:6]}"
    sm.create_model(ModelName=name, ExecutionRoleArn=ROLE,
                    PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": str(scripted_model_dir)})
    return name


def _lines(*records: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def _job(sm: Any, model: str, uri: str, out: str, **extra: Any) -> str:
    name = f"job-{uuid.uuid4().hex[:10]}"
    tin = {"DataSource": {"S3DataSource": {"S3DataType": extra.pop("data_type", "S3Prefix"), "S3Uri": uri}},
           "ContentType": "application/json", "SplitType": "Line", **extra.pop("tin", {})}
    sm.create_transform_job(TransformJobName=name, ModelName=model, TransformInput=tin,
                            TransformOutput={"S3OutputPath": out, "AssembleWith": "Line", "Accept": "application/json"},
                            TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1}, **extra)
    return name


def _wait(sm: Any, name: str, timeout_s: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        desc = sm.describe_transform_job(TransformJobName=name)
        if desc["TransformJobStatus"] in ("Completed", "Failed", "Stopped"):
            return dict(desc)
        time.sleep(0.2)
    raise AssertionError(f"transform job {name} did not finish: {desc}")


def _read(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_records_in_order_and_a_failed_record_fails_its_file_only(sm: Any, s3: Any, bucket: str,
                                                                  scripted_model: str) -> None:
    s3.put_object(Bucket=bucket, Key="in1/a.jsonl", Body=_lines(*({"i": i, "sleep": 0.05 * (5 - i)} for i in range(5))))
    s3.put_object(Bucket=bucket, Key="in1/sub/b.jsonl", Body=_lines({"i": "b0"}, {"i": "b1"}))
    s3.put_object(Bucket=bucket, Key="in1/c.jsonl", Body=_lines({"i": "c0"}, {"fail": "record is bad"}, {"i": "c2"}))
    s3.put_object(Bucket=bucket, Key="in1/d.jsonl", Body=_lines({"i": "d0"}, b"{not json"))
    name = _job(sm, scripted_model, f"s3://{bucket}/in1/", f"s3://{bucket}/out1", MaxConcurrentTransforms=3,
                BatchStrategy="SingleRecord", ModelClientConfig={"InvocationsTimeoutInSeconds": 60,
                                                                 "InvocationsMaxRetries": 1})
    assert sm.describe_transform_job(TransformJobName=name)["TransformJobStatus"] in ("InProgress", "Completed",
                                                                                      "Failed")
    desc = _wait(sm, name)
    assert desc["TransformJobStatus"] == "Failed"
    reason = desc["FailureReason"]
    assert "2 of 4 input file(s) failed" in reason and "in1/c.jsonl" in reason and "record 2" in reason
    assert "record is bad" in reason
    assert desc["TransformStartTime"] <= desc["TransformEndTime"]
    assert desc["MaxConcurrentTransforms"] == 3 and desc["ModelClientConfig"]["InvocationsMaxRetries"] == 1
    # the good files are complete, records in input order (the first records slept longest)
    assert _keys(s3, bucket, "out1/") == ["out1/a.jsonl.out", "out1/sub/b.jsonl.out"]
    lines = _read(s3, bucket, "out1/a.jsonl.out").decode().splitlines()
    assert [json.loads(line)["echo"]["i"] for line in lines] == [0, 1, 2, 3, 4]
    assert [json.loads(x)["echo"]["i"] for x in _read(s3, bucket, "out1/sub/b.jsonl.out").decode().splitlines()] == [
        "b0", "b1"]


def test_gzip_input_and_manifest_input(sm: Any, s3: Any, bucket: str, scripted_model: str) -> None:
    s3.put_object(Bucket=bucket, Key="gz/p.jsonl.gz", Body=gzip.compress(_lines({"i": 1}, {"i": 2})))
    gz = _job(sm, scripted_model, f"s3://{bucket}/gz/p.jsonl.gz", f"s3://{bucket}/gzout/",
              tin={"CompressionType": "Gzip"})
    s3.put_object(Bucket=bucket, Key="m/data/x.jsonl", Body=_lines({"i": "x"}))
    s3.put_object(Bucket=bucket, Key="m/data/y/z.jsonl", Body=_lines({"i": "z1"}, {"i": "z2"}))
    s3.put_object(Bucket=bucket, Key="m/data/ignored.jsonl", Body=_lines({"i": "no"}))
    s3.put_object(Bucket=bucket, Key="m/list.manifest",
                  Body=json.dumps([{"prefix": f"s3://{bucket}/m/data/"}, "y/z.jsonl", "x.jsonl"]).encode())
    manifest = _job(sm, scripted_model, f"s3://{bucket}/m/list.manifest", f"s3://{bucket}/mout",
                    data_type="ManifestFile")
    assert _wait(sm, gz)["TransformJobStatus"] == "Completed"
    assert [json.loads(x)["echo"]["i"] for x in _read(s3, bucket, "gzout/p.jsonl.gz.out").splitlines()] == [1, 2]
    assert _wait(sm, manifest)["TransformJobStatus"] == "Completed"
    assert _keys(s3, bucket, "mout/") == ["mout/x.jsonl.out", "mout/y/z.jsonl.out"]
    assert [json.loads(x)["echo"]["i"] for x in _read(s3, bucket, "mout/y/z.jsonl.out").splitlines()] == ["z1", "z2"]
    # a file that is not gzip fails its file, with the reason
    s3.put_object(Bucket=bucket, Key="gzbad/p.jsonl.gz", Body=b"plain text, not gzip\n")
    bad = _job(sm, scripted_model, f"s3://{bucket}/gzbad/", f"s3://{bucket}/gzbadout", tin={"CompressionType": "Gzip"})
    desc = _wait(sm, bad)
    assert desc["TransformJobStatus"] == "Failed" and "not valid gzip" in desc["FailureReason"]


def test_stop_transform_job(sm: Any, s3: Any, bucket: str, scripted_model: str) -> None:
    s3.put_object(Bucket=bucket, Key="slow/s.jsonl", Body=_lines(*({"i": i, "sleep": 1} for i in range(30))))
    name = _job(sm, scripted_model, f"s3://{bucket}/slow/", f"s3://{bucket}/slowout", MaxConcurrentTransforms=1)
    time.sleep(1.0)
    sm.stop_transform_job(TransformJobName=name)
    assert sm.describe_transform_job(TransformJobName=name)["TransformJobStatus"] in ("Stopping", "Stopped")
    assert _wait(sm, name, timeout_s=60)["TransformJobStatus"] == "Stopped"
    assert _keys(s3, bucket, "slowout/") == []  # a stopped file writes nothing, not a partial output
    sm.stop_transform_job(TransformJobName=name)  # stopping a stopped job is a no-op


def test_errors_listing_and_unsupported_fields(sm: Any, bucket: str, scripted_model: str) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as err:
        sm.describe_transform_job(TransformJobName="no-such-job")
    assert err.value.response["Error"]["Code"] == "ResourceNotFound"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as err:
        sm.stop_transform_job(TransformJobName="no-such-job")
    assert err.value.response["Error"]["Code"] == "ResourceNotFound"
    with pytest.raises(ClientError) as err:
        _job(sm, scripted_model, f"s3://{bucket}/x/", f"s3://{bucket}/y", DataProcessing={"InputFilter": "$.a"})
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert "DataProcessing" in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as err:
        _job(sm, scripted_model, f"s3://{bucket}/x/", f"s3://{bucket}/y", tin={"SplitType": "RecordIO"})
    assert "SplitType" in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as err:
        _job(sm, "no-such-model", f"s3://{bucket}/x/", f"s3://{bucket}/y")
    assert "Could not find model" in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as err:
        _job(sm, scripted_model, f"s3://{bucket}/x/", f"s3://{bucket}/y", BatchStrategy="Everything")
    assert "batchStrategy" in err.value.response["Error"]["Message"]
    missing = _job(sm, scripted_model, f"s3://{bucket}/nothing-here/", f"s3://{bucket}/y")
    desc = _wait(sm, missing)
    assert desc["TransformJobStatus"] == "Failed" and "no input files" in desc["FailureReason"]
    with pytest.raises(ClientError) as err:  # the name is taken
        sm.create_transform_job(TransformJobName=missing, ModelName=scripted_model, TransformInput={
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{bucket}/x/"}}},
            TransformOutput={"S3OutputPath": f"s3://{bucket}/y"},
            TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1})
    assert err.value.response["Error"]["Code"] == "ResourceInUse"
    # listing: filters, sort and pagination as boto3's paginator sends them
    pages = sm.get_paginator("list_transform_jobs").paginate(StatusEquals="Failed", SortBy="Name",
                                                              SortOrder="Ascending", PaginationConfig={"PageSize": 1})
    listed = [[s["TransformJobName"] for s in page["TransformJobSummaries"]] for page in pages]
    names = [n for page in listed for n in page]
    assert missing in names and names == sorted(names) and all(len(page) <= 1 for page in listed)
    summary = sm.list_transform_jobs(NameContains=missing)["TransformJobSummaries"]
    assert [(s["TransformJobName"], s["TransformJobStatus"]) for s in summary] == [(missing, "Failed")]
    assert "no input files" in summary[0]["FailureReason"]
    assert sm.list_transform_jobs(NameContains=missing, CreationTimeAfter=time.time() + 60)[
        "TransformJobSummaries"] == []


_COUNTING_INFERENCE = '''\
import json
import os
import time


def model_fn(model_dir):
    return None


def predict_fn(data, model):
    with open(os.environ["TRANSFORM_MARKER"], "a") as fh:  # every computation of a record, started
        fh.write(f"{data['i']}\\n")
    time.sleep(0.4)
    return {"i": data["i"]}


def output_fn(prediction, accept):
    return json.dumps(prediction)
'''


@pytest.mark.slow
def test_job_survives_daemon_kill_9_without_recomputing_finished_records(tmp_path: Any, moto_server: str, s3: Any,
                                                                         bucket: str) -> None:
    import signal
    import sqlite3

    from conftest import DaemonProcess

    model_dir = tmp_path / "counting"
    (model_dir / "code").mkdir(parents=True)
    (model_dir / "code" / "inference.py").write_text(_COUNTING_INFERENCE)
    marker = tmp_path / "computed.txt"
    s3.put_object(Bucket=bucket, Key="kill/r.jsonl", Body=_lines(*({"i": i} for i in range(12))))
    home = tmp_path / "home"
    env = {"AWS_ENDPOINT_URL_S3": moto_server, "HF_HUB_OFFLINE": "1", "SDMAKER_STANDBY_WORKERS": "0",
           "SDMAKER_MAX_INSTANCES": "1"}  # one worker process for all jobs together: a second job waits
    daemon = DaemonProcess(home, env=env).start()
    try:
        sm = daemon.boto("sagemaker")
        sm.create_model(ModelName="counting", ExecutionRoleArn=ROLE,
                        PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": str(model_dir)})
        name = _job(sm, "counting", f"s3://{bucket}/kill/", f"s3://{bucket}/killout",
                    Environment={"TRANSFORM_MARKER": str(marker)})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not marker.exists() or len(marker.read_text().split()) < 4):
            time.sleep(0.05)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=30)
        time.sleep(1.0)  # the job's worker dies with the daemon (parent-death signal)
        with sqlite3.connect(home / "endpoints" / "transform.sqlite3") as db:
            finished = {int(r[0]) for r in db.execute("SELECT unit FROM transform_units WHERE job = ?", (name,))}
        assert finished, "no record had finished before the kill"
        before = marker.read_text().split()
        assert _keys(s3, bucket, "killout/") == []  # nothing half-written

        daemon = DaemonProcess(home, env=env, port=daemon.port).start()
        sm = daemon.boto("sagemaker")
        s3.put_object(Bucket=bucket, Key="kill2/r.jsonl", Body=_lines({"i": 99}))
        second = _job(sm, "counting", f"s3://{bucket}/kill2/", f"s3://{bucket}/kill2out",
                      Environment={"TRANSFORM_MARKER": str(marker)})
        desc = _wait(sm, name)
        assert desc["TransformJobStatus"] == "Completed", desc
        out = [json.loads(x)["i"] for x in _read(s3, bucket, "killout/r.jsonl.out").splitlines()]
        assert out == list(range(12))
        assert _wait(sm, second)["TransformJobStatus"] == "Completed"
        computed = marker.read_text().split()
        first = [c for c in computed if c != "99"]
        for i in finished:  # a record finished before the kill is never computed again
            assert first.count(str(i)) == 1, (i, computed)
        assert sorted(set(first)) == sorted(str(i) for i in range(12))
        assert len(first) <= 12 + (len(before) - len(finished))  # only records in flight at the kill re-ran
        # the second job waited for the first one's worker: its record ran after all of the first job's
        log = (home / "endpoints" / "transform-jobs" / second / "job.log").read_text()
        assert "waiting for room: running jobs hold 1 of 1 worker(s)" in log
        assert computed.index("99") == len(computed) - 1
    finally:
        daemon.stop()


@pytest.mark.slow
def test_sagemaker_sdk_transformer_runs_unchanged(daemon: Any, moto_server: str, s3: Any, bucket: str, sd1_dir: Any,
                                                  tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HuggingFaceModel.transformer(...).transform(...)`` then ``.wait()``, both tailing the job's logs as the SDK
    does by default (CloudWatch Logs calls answered by the daemon), on the default handler (step batching)."""
    import base64
    import io

    from PIL import Image
    from test_sdk import BUCKET, _fast_sdk_clock, _sdmaker_env, _upload_model_tar

    model_uri = _upload_model_tar(sd1_dir, moto_server, tmp_path)
    exports = _sdmaker_env(daemon.url, tmp_path)
    assert exports["AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"] == daemon.url
    for key, value in exports.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    prompts = [{"prompt": f"a red circle number {i}", "height": 64, "width": 64, "num_inference_steps": 2,
                "seed": 100 + i} for i in range(4)]
    s3.put_object(Bucket=BUCKET, Key="batch/prompts.jsonl", Body=_lines(*prompts))

    # The SDK polls every 10 s and describes the job every 30 s while it tails logs; a clock that skips the
    # sleeps keeps this test short without changing the SDK's calls.
    _fast_sdk_clock(monkeypatch)

    # ---- the SageMaker SDK, as a user writes it ------------------------------------------------------------
    from sagemaker.huggingface.model import HuggingFaceModel

    huggingface_model = HuggingFaceModel(model_data=model_uri, role=ROLE, transformers_version="4.26",
                                         pytorch_version="1.13", py_version="py39")
    transformer = huggingface_model.transformer(instance_count=1, instance_type="ml.m5.xlarge",
                                                output_path=f"s3://{BUCKET}/batch-out", assemble_with="Line",
                                                accept="application/json")
    transformer.transform(data=f"s3://{BUCKET}/batch/prompts.jsonl", content_type="application/json",
                          split_type="Line")
    transformer.wait()
    # ----------------------------------------------------------------------------------------------------------

    sm = daemon.boto("sagemaker")
    desc = sm.describe_transform_job(TransformJobName=transformer.latest_transform_job.name)
    assert desc["TransformJobStatus"] == "Completed"
    lines = _read(s3, BUCKET, "batch-out/prompts.jsonl.out").decode().splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["seeds"] for a in answers] == [[100 + i] for i in range(4)]
    for answer in answers:
        image = Image.open(io.BytesIO(base64.b64decode(answer["generated_images"][0])))
        assert image.size == (64, 64)
    logs = daemon.boto("logs").get_log_events(logGroupName="/aws/sagemaker/TransformJobs",
                                              logStreamName=f"{desc['TransformJobName']}/sdmaker", startFromHead=True)
    text = "\n".join(e["message"] for e in logs["events"])
    assert "execution parameters" in text and "'BatchStrategy': 'SingleRecord'" in text


_LINES_INFERENCE = '''\
import json


def model_fn(model_dir):
    return None


def transform_fn(model, data, content_type, accept):
    lines = data.splitlines()
    return "\\n".join(json.dumps({"n": len(lines), "i": json.loads(line)["i"]}) for line in lines)
'''


def test_multi_record_mini_batches_fit_max_payload(sm: Any, s3: Any, bucket: str, tmp_path_factory: Any) -> None:
    """MultiRecord packs consecutive lines up to MaxPayloadInMB into one request; outputs stay in input order."""
    model_dir = tmp_path_factory.mktemp("lines-model")
    (model_dir / "code").mkdir()
    (model_dir / "code" / "inference.py").write_text(_LINES_INFERENCE)
    model = f"lines-{uuid.uuid4().hex[:6]}"
    sm.create_model(ModelName=model, ExecutionRoleArn=ROLE,
                    PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": str(model_dir)})
    pad = "x" * 300_000  # 3 records fit in 1 MB, 4 do not
    s3.put_object(Bucket=bucket, Key="multi/r.jsonl", Body=_lines(*({"i": i, "pad": pad} for i in range(7))))
    name = _job(sm, model, f"s3://{bucket}/multi/", f"s3://{bucket}/multiout", BatchStrategy="MultiRecord",
                MaxPayloadInMB=1)
    desc = _wait(sm, name)
    assert desc["TransformJobStatus"] == "Completed", desc
    out = [json.loads(x) for x in _read(s3, bucket, "multiout/r.jsonl.out").splitlines()]
    assert [(o["i"], o["n"]) for o in out] == [(0, 3), (1, 3), (2, 3), (3, 3), (4, 3), (5, 3), (6, 1)]
    assert desc["BatchStrategy"] == "MultiRecord" and desc["MaxPayloadInMB"] == 1


def test_split_units_and_execution_parameters() -> None:
    """How a file becomes requests, and which settings win (the job's, the container's, AWS's defaults)."""
    from sdmaker.serving.daemon._transform import RecordFailed, resolve_parameters, split_units

    data = b'{"a":1}\r\n\n{"b":2}\n   \n{"c":3}'
    assert split_units(data, "Line", "SingleRecord", 100) == [(b'{"a":1}', 0, 1), (b'{"b":2}', 1, 1), (b'{"c":3}', 2, 1)]
    assert split_units(data, "Line", "MultiRecord", 15) == [(b'{"a":1}\n{"b":2}', 0, 2), (b'{"c":3}', 2, 1)]
    assert split_units(data, "None", "MultiRecord", 100) == [(data, 0, 1)]
    with pytest.raises(RecordFailed, match="record 2 is 9 bytes"):
        split_units(b"a\nbbbbbbbbb\n", "Line", "SingleRecord", 8)
    assert split_units(b"", "Line", "SingleRecord", 8) == []
    offered = {"MaxConcurrentTransforms": 8, "BatchStrategy": "SingleRecord", "MaxPayloadInMB": 6}
    assert resolve_parameters({}, None).to_dict() == {"BatchStrategy": "SingleRecord", "MaxConcurrentTransforms": 1,
                                                      "MaxPayloadInMB": 6}
    assert resolve_parameters({}, offered).max_concurrent == 8
    mixed = resolve_parameters({"MaxConcurrentTransforms": 2, "BatchStrategy": "MultiRecord", "MaxPayloadInMB": 0},
                               offered)
    assert (mixed.max_concurrent, mixed.batch_strategy, mixed.max_payload_mb) == (2, "MultiRecord", 6)
    assert resolve_parameters({}, {"MaxConcurrentTransforms": "lots", "BatchStrategy": 3}).to_dict() == {
        "BatchStrategy": "SingleRecord", "MaxConcurrentTransforms": 1, "MaxPayloadInMB": 6}
