"""Autoscaling (issue 14): the Application Auto Scaling API on the daemon, driven by boto3's own
``application-autoscaling`` client, and the local backend's target tracking changing real worker pools.

One daemon for the module, with a short metric window (``SDMAKER_AUTOSCALING_WINDOW=3``: concurrency averaged
over 0.5 s) and a machine that holds 4 worker processes and 1500 MiB of workers. Loads are the scripted model's
sleeping requests (the concurrency they make does not depend on the machine's speed); the cold start generates a
64x64 image on the built-in ``mini``. Waits poll until a condition holds (a give-up bound, never a timing
assertion).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError
from conftest import DaemonProcess

from sdmaker.serving.daemon._scaling import (
    CONCURRENCY_METRIC,
    INVOCATIONS_METRIC,
    ScalingTarget,
    TrackingPolicy,
    desired_capacity,
    parse_resource_id,
)

DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def _rid(name: str) -> str:
    return f"endpoint/{name}/variant/AllTraffic"


def _wait(check: Callable[[], Any], what: str, limit_s: float = 180.0) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def _details(d: DaemonProcess, name: str) -> dict[str, Any]:
    reply = httpx.get(f"{d.url}/sdmaker/v1/endpoints/{name}", timeout=10)
    reply.raise_for_status()
    return dict(reply.json())


def _ready_workers(d: DaemonProcess, name: str) -> int:
    return sum(1 for w in _details(d, name)["workers"] if w["state"] in ("Ready", "Busy"))


def _counts(d: DaemonProcess, name: str) -> tuple[int, int, str]:
    desc = d.boto("sagemaker").describe_endpoint(EndpointName=name)
    variant = desc["ProductionVariants"][0]
    return variant["CurrentInstanceCount"], variant["DesiredInstanceCount"], desc["EndpointStatus"]


def _invoke(d: DaemonProcess, name: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = d.boto("sagemaker-runtime").invoke_endpoint(EndpointName=name, Body=json.dumps(body),
                                                         ContentType="application/json")
    return dict(json.loads(answer["Body"].read()))


def _error(info: pytest.ExceptionInfo[ClientError]) -> tuple[str, str]:
    return info.value.response["Error"]["Code"], info.value.response["Error"]["Message"]


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory, scripted_model_dir: Path):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("autoscale-home"),
                      env={"SDMAKER_AUTOSCALING_WINDOW": "3", "SDMAKER_MAX_INSTANCES": "4",
                           "SDMAKER_MEMORY_MB": "1500", "HF_HUB_OFFLINE": "1"}).start()
    yield d
    d.stop()


def _policy(aas, name: str, *, target: float = 1.0, out_s: int = 0, in_s: int = 1,  # type: ignore[no-untyped-def]
            metric: str = CONCURRENCY_METRIC, **extra: Any) -> dict[str, Any]:
    return dict(aas.put_scaling_policy(
        PolicyName=f"{name}-policy", ServiceNamespace="sagemaker", ResourceId=_rid(name), ScalableDimension=DIMENSION,
        PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration={
            "TargetValue": target, "PredefinedMetricSpecification": {"PredefinedMetricType": metric},
            "ScaleOutCooldown": out_s, "ScaleInCooldown": in_s, **extra}))


def test_api_round_trip_and_validation(scaled: DaemonProcess, scripted_model_dir: Path) -> None:
    desc = scaled.deploy("as-api", scripted_model_dir)
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    aas = scaled.boto("application-autoscaling")
    rid = _rid("as-api")

    with pytest.raises(ClientError) as info:  # a policy needs a registered target
        _policy(aas, "as-api")
    assert _error(info) == ("ObjectNotFoundException", "No scalable target registered for service namespace: "
                            f"sagemaker, resource ID: {rid}, scalable dimension: {DIMENSION}")
    arn = aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=DIMENSION,
                                       MinCapacity=1, MaxCapacity=1)["ScalableTargetARN"]
    assert arn.startswith("arn:aws:application-autoscaling:us-east-1:000000000000:scalable-target/")
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"], t["ScalableTargetARN"]) for t in targets] == [
        (rid, 1, 1, arn)]
    assert targets[0]["SuspendedState"]["DynamicScalingInSuspended"] is False
    # re-registering updates in place; one bound may be left out
    assert aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=DIMENSION,
                                        MaxCapacity=2)["ScalableTargetARN"] == arn
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"][0]["MaxCapacity"] == 2

    policy = _policy(aas, "as-api", target=5.0, metric=INVOCATIONS_METRIC, out_s=60, in_s=300, DisableScaleIn=True)
    assert ":scalingPolicy:" in policy["PolicyARN"] and policy["PolicyARN"].endswith(f"{rid}:policyName/as-api-policy")
    listed = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)["ScalingPolicies"]
    assert [p["PolicyName"] for p in listed] == ["as-api-policy"]
    config = listed[0]["TargetTrackingScalingPolicyConfiguration"]
    assert (config["TargetValue"], config["ScaleOutCooldown"], config["ScaleInCooldown"], config["DisableScaleIn"]) == (
        5.0, 60, 300, True)
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == INVOCATIONS_METRIC

    refused = [  # (request changes, member the ValidationException names)
        ({"PolicyType": "StepScaling"}, "policyType"),
        ({"TargetTrackingScalingPolicyConfiguration": {"TargetValue": 0.0, "PredefinedMetricSpecification": {
            "PredefinedMetricType": CONCURRENCY_METRIC}}}, "targetTrackingScalingPolicyConfiguration.targetValue"),
        ({"TargetTrackingScalingPolicyConfiguration": {"TargetValue": 1.0, "PredefinedMetricSpecification": {
            "PredefinedMetricType": "ALBRequestCountPerTarget"}}}, "predefinedMetricType"),
        ({"TargetTrackingScalingPolicyConfiguration": {"TargetValue": 1.0, "ScaleInCooldown": -1,
                                                       "PredefinedMetricSpecification": {
                                                           "PredefinedMetricType": CONCURRENCY_METRIC}}},
         "scaleInCooldown"),
        ({"TargetTrackingScalingPolicyConfiguration": {"TargetValue": 1.0}}, "predefinedMetricSpecification"),
        ({"ServiceNamespace": "ecs"}, "serviceNamespace"),
        ({"ResourceId": "endpoint/as-api"}, "resourceId"),
    ]
    base = {"PolicyName": "bad", "ServiceNamespace": "sagemaker", "ResourceId": rid, "ScalableDimension": DIMENSION,
            "PolicyType": "TargetTrackingScaling", "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": 1.0, "PredefinedMetricSpecification": {"PredefinedMetricType": CONCURRENCY_METRIC}}}
    for change, member in refused:
        with pytest.raises(ClientError) as info:
            aas.put_scaling_policy(**{**base, **change})
        code, message = _error(info)
        assert code == "ValidationException" and member in message, (change, message)
    for bounds, member in [({"MinCapacity": 3, "MaxCapacity": 2}, "Minimum capacity (3) cannot be greater"),
                           ({"MinCapacity": -1, "MaxCapacity": 2}, "minCapacity"),
                           ({"MinCapacity": 1, "MaxCapacity": 5}, "SDMAKER_MAX_INSTANCES")]:
        with pytest.raises(ClientError) as info:
            aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=DIMENSION,
                                         **bounds)
        code, message = _error(info)
        assert code == "ValidationException" and member in message, (bounds, message)
    # the machine's memory: 1500 MiB hold 2 of these workers (runtime + one small image each), not 3
    with pytest.raises(ClientError) as info:
        aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=DIMENSION,
                                     MinCapacity=1, MaxCapacity=3)
    code, message = _error(info)
    assert code == "ValidationException" and "maxCapacity" in message and "SDMAKER_MEMORY_MB" in message, message
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"][0]["MaxCapacity"] == 2
    # a shape error boto3 would catch itself, sent raw: botocore's model is the server's first check too
    raw = httpx.post(scaled.url + "/", headers={"X-Amz-Target": "AnyScaleFrontendService.RegisterScalableTarget",
                                                "Content-Type": "application/x-amz-json-1.1"},
                     content=json.dumps({"ResourceId": rid, "ScalableDimension": DIMENSION}))
    assert raw.status_code == 400 and raw.json()["__type"] == "ValidationException"
    assert "serviceNamespace" in raw.json()["message"]

    aas.delete_scaling_policy(PolicyName="as-api-policy", ServiceNamespace="sagemaker", ResourceId=rid,
                              ScalableDimension=DIMENSION)
    with pytest.raises(ClientError) as info:
        aas.delete_scaling_policy(PolicyName="as-api-policy", ServiceNamespace="sagemaker", ResourceId=rid,
                                  ScalableDimension=DIMENSION)
    assert _error(info)[0] == "ObjectNotFoundException"
    aas.deregister_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=DIMENSION)
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])["ScalableTargets"] == []
    with pytest.raises(ClientError) as info:
        aas.deregister_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=DIMENSION)
    assert _error(info)[0] == "ObjectNotFoundException"
    scaled.boto("sagemaker").delete_endpoint(EndpointName="as-api")


def test_scales_out_under_load_and_back_in_when_idle(scaled: DaemonProcess, scripted_model_dir: Path) -> None:
    name = "as-load"
    assert scaled.deploy(name, scripted_model_dir)["EndpointStatus"] == "InService"
    aas = scaled.boto("application-autoscaling")
    aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=_rid(name), ScalableDimension=DIMENSION,
                                 MinCapacity=1, MaxCapacity=2)
    _policy(aas, name, target=1.0, out_s=0, in_s=1)  # 1 request in flight per instance

    answers: list[dict[str, Any]] = []
    failures: list[Exception] = []
    stop = threading.Event()

    def client() -> None:  # three clients in a loop: about 3 requests in flight for 1 instance
        while not stop.is_set():
            try:
                answers.append(_invoke(scaled, name, {"sleep": 0.5}))
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        _wait(lambda: _ready_workers(scaled, name) == 2, "a second worker under load")
        pids = {w["pid"] for w in _details(scaled, name)["workers"]}
        _wait(lambda: pids <= {a["pid"] for a in answers}, "both workers to serve")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert failures == []


    def scaled_in() -> list[dict[str, Any]]:
        found = aas.describe_scaling_activities(ServiceNamespace="sagemaker", ResourceId=_rid(name))[
            "ScalingActivities"]
        return found if len(found) >= 2 and found[0]["StatusCode"] != "InProgress" else []

    activities = _wait(scaled_in, "the idle endpoint to scale back in")
    assert _counts(scaled, name)[:2] == (1, 1)
    assert len(_details(scaled, name)["workers"]) == 1
    done = [(a["Description"], a["StatusCode"]) for a in reversed(activities)]
    assert done == [("Setting desired instance count to 2.", "Successful"),
                    ("Setting desired instance count to 1.", "Successful")], activities
    assert "above its target of 1" in activities[1]["Cause"] and "below its target of 1" in activities[0]["Cause"]
    assert activities[0]["StatusMessage"].startswith("Successfully set desired instance count to 1.")
    assert _invoke(scaled, name, {"x": 1})["echo"] == {"x": 1}
    scaled.boto("sagemaker").delete_endpoint(EndpointName=name)
    aas.deregister_scalable_target(ServiceNamespace="sagemaker", ResourceId=_rid(name), ScalableDimension=DIMENSION)


@pytest.mark.slow  # the built-in mini loads twice
def test_min_capacity_zero_cold_start(scaled: DaemonProcess) -> None:
    name = "as-zero"
    assert scaled.deploy(name, "mini")["EndpointStatus"] == "InService"
    aas = scaled.boto("application-autoscaling")
    aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=_rid(name), ScalableDimension=DIMENSION,
                                 MinCapacity=0, MaxCapacity=1)
    _policy(aas, name, target=1.0, in_s=0)
    _wait(lambda: _counts(scaled, name)[:2] == (0, 0), "the idle endpoint to scale in to zero")
    assert _details(scaled, name)["workers"] == []

    body = {"prompt": "a red square", "height": 64, "width": 64, "num_inference_steps": 2}
    answer = scaled.boto("sagemaker-runtime").invoke_endpoint(EndpointName=name, Body=json.dumps(body),
                                                              ContentType="application/json", Accept="image/png")
    assert answer["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"  # answered once a worker had started for it
    causes = [a["Cause"] for a in aas.describe_scaling_activities(
        ServiceNamespace="sagemaker", ResourceId=_rid(name))["ScalingActivities"]]
    assert any("a request arrived while the variant had no instance" in c for c in causes), causes
    scaled.boto("sagemaker").delete_endpoint(EndpointName=name)
    aas.deregister_scalable_target(ServiceNamespace="sagemaker", ResourceId=_rid(name), ScalableDimension=DIMENSION)


@pytest.mark.slow  # restarts the daemon
def test_capacity_update_drains_in_flight_requests_and_survives_restart(scaled: DaemonProcess,
                                                                        scripted_model_dir: Path) -> None:
    name = "as-cap"
    sm = scaled.boto("sagemaker")
    assert scaled.deploy(name, scripted_model_dir)["EndpointStatus"] == "InService"

    def resize(count: int) -> None:
        sm.update_endpoint_weights_and_capacities(EndpointName=name, DesiredWeightsAndCapacities=[
            {"VariantName": "AllTraffic", "DesiredInstanceCount": count}])
        _wait(lambda: _counts(scaled, name) == (count, count, "InService"), f"{count} instance(s) in service")

    resize(2)
    answers: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: answers.append(_invoke(scaled, name, {"sleep": 3}))) for _ in range(2)]
    for thread in threads:
        thread.start()
    _wait(lambda: all(w["in_flight"] == 1 for w in _details(scaled, name)["workers"]), "a request on each worker")
    resize(1)  # one worker retires with a request in flight: it finishes that request first
    for thread in threads:
        thread.join(timeout=120)
    assert [a["echo"] for a in answers] == [{"sleep": 3}, {"sleep": 3}]
    assert len({a["pid"] for a in answers}) == 2
    with pytest.raises(ClientError) as info:  # more workers than the machine holds
        sm.update_endpoint_weights_and_capacities(EndpointName=name, DesiredWeightsAndCapacities=[
            {"VariantName": "AllTraffic", "DesiredInstanceCount": 9}])
    assert "desiredInstanceCount" in _error(info)[1] and "SDMAKER_MAX_INSTANCES" in _error(info)[1]

    # durable: targets, policies, activities and the scaled count come back with the daemon
    aas = scaled.boto("application-autoscaling")
    aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=_rid(name), ScalableDimension=DIMENSION,
                                 MinCapacity=2, MaxCapacity=2)  # bounds move the count at once: an activity
    _policy(aas, name, target=50.0, metric=INVOCATIONS_METRIC, DisableScaleIn=True)
    _wait(lambda: _counts(scaled, name)[:2] == (2, 2), "the minimum capacity to apply")
    before = aas.describe_scaling_activities(ServiceNamespace="sagemaker", ResourceId=_rid(name))["ScalingActivities"]
    assert before[0]["Cause"] == "minimum capacity was set to 2" and before[0]["StatusCode"] == "Successful"
    scaled.stop()
    scaled.start()
    aas = scaled.boto("application-autoscaling")
    sm = scaled.boto("sagemaker")
    sm.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 0.5, "MaxAttempts": 600})
    assert _counts(scaled, name)[:2] == (2, 2)
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[_rid(name)])["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [(_rid(name), 2, 2)]
    policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=_rid(name))["ScalingPolicies"]
    assert [p["PolicyName"] for p in policies] == [f"{name}-policy"]
    after = aas.describe_scaling_activities(ServiceNamespace="sagemaker", ResourceId=_rid(name))["ScalingActivities"]
    assert [a["ActivityId"] for a in after] == [a["ActivityId"] for a in before]


def test_sdmaker_env_points_boto3_application_autoscaling_at_the_daemon(
        scaled: DaemonProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from typer.testing import CliRunner

    from sdmaker.cli import app

    monkeypatch.setenv("SDMAKER_HOME", str(tmp_path))
    res = CliRunner().invoke(app, ["env", "--url", scaled.url])
    assert res.exit_code == 0, res.output
    exports = dict(line.removeprefix("export ").split("=", 1) for line in res.output.splitlines()
                   if line.startswith("export AWS_ENDPOINT_URL_"))
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_APPLICATION_AUTO_SCALING",
                       exports["AWS_ENDPOINT_URL_APPLICATION_AUTO_SCALING"])
    client = boto3.client("application-autoscaling", region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    assert client.meta.endpoint_url == scaled.url
    assert "ScalableTargets" in client.describe_scalable_targets(ServiceNamespace="sagemaker")


# -- in-process: the seam's arithmetic and the signing scope ---------------------------------------------------


def test_target_tracking_arithmetic_and_ray_translation() -> None:
    assert desired_capacity(0.0, 1.0) == 0
    assert desired_capacity(0.2, 1.0) == 1  # any load keeps one instance
    assert desired_capacity(3.0, 1.0) == 3
    assert desired_capacity(3.0, 1.5) == 2
    assert desired_capacity(300.0, 100.0) == 3  # invocations per minute: 300 total at 100 per instance
    assert parse_resource_id("endpoint/my-ep/variant/AllTraffic") == ("my-ep", "AllTraffic")
    assert parse_resource_id("endpoint/my_ep/variant/AllTraffic") is None
    target = ScalingTarget(0, 4, (TrackingPolicy("p", INVOCATIONS_METRIC, 120.0, 30, 600),))
    assert target.clamp(9) == 4 and target.clamp(-1) == 0
    ray = target.ray_autoscaling_config(seconds_per_request=2.0)
    assert ray == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 4.0, "upscale_delay_s": 30,
                   "downscale_delay_s": 600}
    both = ScalingTarget(1, 2, (target.policies[0], TrackingPolicy("c", CONCURRENCY_METRIC, 2.0, disable_scale_in=True)))
    assert both.ray_autoscaling_config()["target_ongoing_requests"] == 2.0
    assert both.ray_autoscaling_config()["downscale_delay_s"] >= 10**9


def test_sigv4_for_application_autoscaling_verifies() -> None:
    """boto3 signs application-autoscaling with its own service name in the credential scope."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from sdmaker.config import Settings
    from sdmaker.serving.daemon._auth import verify_request

    settings = Settings(home=Path("/nonexistent"), auth_access_key_id="AKIDTEST", auth_secret_access_key="s3cret")
    body = b'{"ServiceNamespace": "sagemaker"}'
    request = AWSRequest(method="POST", url="http://127.0.0.1:8765/", data=body, headers={
        "X-Amz-Target": "AnyScaleFrontendService.DescribeScalableTargets",
        "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(Credentials("AKIDTEST", "s3cret"), "application-autoscaling", "us-east-1").add_auth(request)
    assert "/application-autoscaling/aws4_request" in request.headers["Authorization"]
    headers: dict[str, list[str]] = {"host": ["127.0.0.1:8765"]}
    for key, value in request.headers.items():
        headers.setdefault(key.lower(), []).append(value if isinstance(value, str) else value.decode())
    assert verify_request(settings, method="POST", path="/", query="", headers=headers, body=body) == "sigv4:AKIDTEST"


def test_target_tracking_decisions_and_cooldowns(tmp_path: Path) -> None:
    """The loop's decisions on recorded samples: both metrics, cooldowns, DisableScaleIn, the full-window rule."""
    from types import SimpleNamespace

    from sdmaker.config import Settings
    from sdmaker.serving.daemon._autoscaler import Autoscaler, _Tracked
    from sdmaker.serving.daemon._state import StateDB

    manager = SimpleNamespace(db=StateDB(tmp_path / "state.sqlite3"),
                              settings=Settings(home=tmp_path, autoscaling_window_s=6.0))
    scaler = Autoscaler(manager)  # type: ignore[arg-type]
    per_minute = TrackingPolicy("inv", INVOCATIONS_METRIC, 60.0, scale_out_cooldown_s=10, scale_in_cooldown_s=20)
    busy = _Tracked("ep", "AllTraffic", ScalingTarget(1, 4, (per_minute,)), native=False)
    busy.samples.extend((float(t), 3 * t, 2) for t in range(7))  # 3 answered per second: 180 a minute
    count, cause = scaler._decide(busy, 1, now=6.0) or (None, "")
    assert count == 3 and "180 per instance over the last 6 s, above its target of 60" in cause
    busy.last_scale_out = 0.0
    assert scaler._decide(busy, 1, now=6.0) is None  # within ScaleOutCooldown of the last scale-out
    assert scaler._decide(busy, 3, now=6.0) is None  # at the desired count already

    idle = _Tracked("ep", "AllTraffic", ScalingTarget(1, 4, (per_minute,)), native=False)
    idle.samples.extend((float(t), 100, 0) for t in range(7))
    assert scaler._decide(idle, 3, now=6.0) == (1, "policy inv: SageMakerVariantInvocationsPerInstance was 0 per "
                                                   "instance over the last 6 s, below its target of 60")
    idle.last_scaling = 0.0
    assert scaler._decide(idle, 3, now=6.0) is None  # within ScaleInCooldown of the last activity
    short = _Tracked("ep", "AllTraffic", idle.target, native=False)
    short.samples.extend((float(t), 100, 0) for t in range(3))
    assert scaler._decide(short, 3, now=2.0) is None  # scale in only on a full window of low load
    held = _Tracked("ep", "AllTraffic", ScalingTarget(1, 4, (TrackingPolicy(
        "c", CONCURRENCY_METRIC, 1.0, scale_in_cooldown_s=0, disable_scale_in=True),)), native=False)
    held.samples.extend(idle.samples)
    assert scaler._decide(held, 3, now=6.0) is None  # DisableScaleIn
    held.samples.append((6.5, 100, 9))  # in flight over the last second (window / 6): 0 and 9, 4.5 on average
    decision = scaler._decide(held, 3, now=6.5)
    assert decision is not None and decision[0] == 4  # 5 wanted, MaxCapacity 4
