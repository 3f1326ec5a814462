"""The SageMaker control plane on the daemon, driven by boto3's own ``sagemaker`` client.

Real processes: the shared ``daemon`` fixture (``sdmaker up`` on a free 127.0.0.1 port) and its workers.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
from botocore.exceptions import ClientError


def _invoke(rt, name: str, body: dict) -> dict:  # type: ignore[no-untyped-def]
    response = rt.invoke_endpoint(EndpointName=name, Body=json.dumps(body), ContentType="application/json")
    return json.loads(response["Body"].read())


def test_model_and_config_describe_delete_and_errors(daemon, scripted_model_dir) -> None:  # type: ignore[no-untyped-def]
    sm = daemon.boto("sagemaker")
    arn = sm.create_model(ModelName="cp-model", ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                          PrimaryContainer={"Image": "x", "ModelDataUrl": str(scripted_model_dir),
                                            "Environment": {"A": "1"}})["ModelArn"]
    assert arn == "arn:aws:sagemaker:us-east-1:000000000000:model/cp-model"
    desc = sm.describe_model(ModelName="cp-model")
    assert desc["PrimaryContainer"]["Environment"] == {"A": "1"}
    assert desc["ExecutionRoleArn"].endswith("role/sm")
    with pytest.raises(ClientError) as info:
        sm.create_model(ModelName="cp-model", PrimaryContainer={"Image": "x"}, ExecutionRoleArn="arn:aws:iam::1:role/r")
    assert info.value.response["Error"] == {"Code": "ValidationException", "Message":
                                            f'Cannot create already existing model "{arn}".'}

    sm.create_endpoint_config(EndpointConfigName="cp-config", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "cp-model", "InitialInstanceCount": 2, "InstanceType": "ml.m5.large"}])
    config = sm.describe_endpoint_config(EndpointConfigName="cp-config")
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 2
    with pytest.raises(ClientError, match="Cannot create already existing endpoint configuration"):
        sm.create_endpoint_config(EndpointConfigName="cp-config", ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "cp-model", "InitialInstanceCount": 1}])
    with pytest.raises(ClientError, match='Could not find model "arn:aws:sagemaker:us-east-1:000000000000:model/nope"'):
        sm.create_endpoint_config(EndpointConfigName="cp-config2", ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "nope", "InitialInstanceCount": 1}])
    with pytest.raises(ClientError, match="Could not find endpoint configuration"):
        sm.create_endpoint(EndpointName="cp-none", EndpointConfigName="missing-config")
    with pytest.raises(ClientError, match="failed to satisfy constraint: Member must satisfy regular expression"):
        sm.describe_endpoint(EndpointName="bad_name")

    sm.delete_endpoint_config(EndpointConfigName="cp-config")
    sm.delete_model(ModelName="cp-model")
    with pytest.raises(ClientError, match='Could not find model'):
        sm.describe_model(ModelName="cp-model")
    with pytest.raises(ClientError, match='Could not find endpoint configuration'):
        sm.delete_endpoint_config(EndpointConfigName="cp-config")


def test_unknown_operation_is_refused(daemon) -> None:  # type: ignore[no-untyped-def]
    import httpx

    reply = httpx.post(daemon.url + "/", headers={"X-Amz-Target": "SageMaker.CreateTrainingJob",
                                                  "Content-Type": "application/x-amz-json-1.1"}, content=b"{}")
    assert reply.status_code == 400
    assert reply.json()["__type"] == "UnknownOperationException"


def test_endpoint_lifecycle_with_update_under_load(daemon, scripted_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Create -> InService (waiter) -> list -> blue/green update while a thread invokes -> delete."""
    sm = daemon.boto("sagemaker")
    rt = daemon.boto("sagemaker-runtime")
    desc = daemon.deploy("cp-life", scripted_model_dir, env={"SCRIPTED_VERSION": "1"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    assert desc["ProductionVariants"][0]["CurrentInstanceCount"] == 1
    assert desc["EndpointArn"].endswith(":endpoint/cp-life")
    names = [e["EndpointName"] for e in sm.list_endpoints(NameContains="cp-life")["Endpoints"]]
    assert names == ["cp-life"]
    assert sm.list_endpoints(StatusEquals="Failed", NameContains="cp-life")["Endpoints"] == []
    with pytest.raises(ClientError, match='Cannot create already existing endpoint "arn:aws:sagemaker:'):
        sm.create_endpoint(EndpointName="cp-life", EndpointConfigName="cp-life-v1")

    versions: list[object] = []
    stop = threading.Event()

    threads: set[str] = set()

    def hammer() -> None:
        while not stop.is_set():
            try:
                answer = _invoke(rt, "cp-life", {"sleep": 0.05})
                versions.append(answer["version"])
                threads.add(f"v{answer['version']}:{answer['omp']}")
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                versions.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        # v2: the new model loads slowly (2 s), so requests keep arriving while both pools exist
        sm.create_model(ModelName="cp-life-v2", ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                        PrimaryContainer={"Image": "x", "ModelDataUrl": str(scripted_model_dir), "Environment": {
                            "SCRIPTED_VERSION": "2", "SCRIPTED_LOAD_SECONDS": "2"}})
        sm.create_endpoint_config(EndpointConfigName="cp-life-v2", ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "cp-life-v2", "InitialInstanceCount": 2,
             "InstanceType": "ml.m5.large"}])
        sm.update_endpoint(EndpointName="cp-life", EndpointConfigName="cp-life-v2")
        assert sm.describe_endpoint(EndpointName="cp-life")["EndpointStatus"] == "Updating"
        sm.get_waiter("endpoint_in_service").wait(EndpointName="cp-life", WaiterConfig={"Delay": 0.5,
                                                                                       "MaxAttempts": 600})
        # a few requests more on the new pool while the old one drains
        count = len(versions)
        while len(versions) < count + 5:
            threading.Event().wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=120)
    failures = [v for v in versions if not isinstance(v, str)]
    assert not failures, failures[:3]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions), "no request may reach the old model after the swap"
    # each worker gets its share of the cores as torch threads (1 worker: all; 2 workers: half each)
    cores = len(os.sched_getaffinity(0))
    preset = os.environ.get("OMP_NUM_THREADS")
    assert threads == {f"v1:{preset or max(1, cores)}", f"v2:{preset or max(1, cores // 2)}"}
    desc = sm.describe_endpoint(EndpointName="cp-life")
    assert desc["EndpointConfigName"] == "cp-life-v2"
    assert desc["ProductionVariants"][0]["CurrentInstanceCount"] == 2

    sm.delete_endpoint(EndpointName="cp-life")
    with pytest.raises(ClientError, match='Could not find endpoint "arn:aws:sagemaker:us-east-1:000000000000:'
                                          'endpoint/cp-life"'):
        sm.describe_endpoint(EndpointName="cp-life")
    with pytest.raises(ClientError) as info:
        rt.invoke_endpoint(EndpointName="cp-life", Body=b"{}", ContentType="application/json")
    assert info.value.response["Error"]["Code"] == "ValidationError"


def test_failed_model_fn_sets_failure_reason(daemon, scripted_model_dir) -> None:  # type: ignore[no-untyped-def]
    desc = daemon.deploy("cp-broken", scripted_model_dir,
                         env={"SCRIPTED_LOAD_FAIL": "weights are corrupt: unet shard 3 of 4 is missing"})
    assert desc["EndpointStatus"] == "Failed"
    assert "weights are corrupt: unet shard 3 of 4 is missing" in desc["FailureReason"]
    sm = daemon.boto("sagemaker")
    with pytest.raises(ClientError, match="Cannot update in-progress endpoint"):
        sm.update_endpoint(EndpointName="cp-broken", EndpointConfigName="cp-broken-v1")
    rt = daemon.boto("sagemaker-runtime")
    with pytest.raises(ClientError) as info:
        rt.invoke_endpoint(EndpointName="cp-broken", Body=b"{}", ContentType="application/json")
    assert info.value.response["Error"]["Code"] == "ValidationError"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    sm.delete_endpoint(EndpointName="cp-broken")
