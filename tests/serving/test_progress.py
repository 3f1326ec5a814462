"""Progress over the daemon: job ids, Server-Sent Events with resume, and InvokeEndpointWithResponseStream.

One endpoint of the built-in ``mini`` (64x64, few steps) and one code-only streaming model, on the shared daemon.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError, EventStreamError

from sdmaker.models import is_builtin_ready

pytestmark = pytest.mark.skipif(not is_builtin_ready("mini"), reason="mini weights not committed in this checkout")

_STREAMING_INFERENCE = '''\
import json
import time


def model_fn(model_dir):
    return {}


def predict_fn(data, model):
    if data.get("fail_at") is None and data.get("plain"):
        return {"plain": True}

    def chunks():
        for i in range(int(data.get("n", 3))):
            if data.get("fail_at") == i:
                raise ValueError("broke at chunk %d" % i)
            time.sleep(float(data.get("sleep", 0)))
            yield {"chunk": i}
    return chunks()
'''


@pytest.fixture(scope="module")
def mini_endpoint(daemon) -> str:  # type: ignore[no-untyped-def]
    # a generous invocation timeout: a loaded CI machine must not turn a slow step into a timeout here
    desc = daemon.deploy("pg-mini", "mini", env={"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "600"})
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    return "pg-mini"


@pytest.fixture(scope="module")
def streaming_endpoint(daemon, tmp_path_factory: pytest.TempPathFactory) -> str:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("streaming-model")
    (root / "code").mkdir()
    (root / "code" / "inference.py").write_text(_STREAMING_INFERENCE)
    desc = daemon.deploy("pg-stream", root)
    assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
    return "pg-stream"


def _body(**kw: object) -> bytes:
    base: dict[str, object] = {"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 4,
                               "seed": 5}
    base.update(kw)
    return json.dumps(base).encode()


def _sse(text: str) -> list[dict]:
    """Parse Server-Sent Events: a list of {"id", "event", "data"} (comments and retry lines skipped)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if "event" in fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def _invoke(daemon, name: str, body: bytes, job_id: str | None = None) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Content-Type": "application/json"}
    if job_id:
        headers["X-Sdmaker-Job-Id"] = job_id
    return httpx.post(f"{daemon.url}/endpoints/{name}/invocations", content=body, headers=headers, timeout=600)


def test_invocations_get_a_job_id_whose_events_replay_and_resume(daemon, mini_endpoint) -> None:  # type: ignore[no-untyped-def]
    reply = _invoke(daemon, mini_endpoint, _body(preview="approx", preview_every=2))
    assert reply.status_code == 200
    job = reply.headers["X-Sdmaker-Job-Id"]
    text = httpx.get(f"{daemon.url}/sdmaker/v1/jobs/{job}/events", timeout=30).text
    events = _sse(text)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["total"] == 4 for s in steps)
    assert all(s["eta_s"] is not None and s["elapsed_s"] >= 0 for s in steps)
    previews = [e["data"] for e in events if e["event"] == "preview"]
    assert [p["step"] for p in previews] == [2]
    assert base64.b64decode(previews[0]["image"])[:2] == b"\xff\xd8"  # a JPEG
    done = events[-1]["data"]
    assert done["status"] == 200 and done["result"] == reply.json()
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    # reconnect after the third event: the rest, the final event included
    again = _sse(httpx.get(f"{daemon.url}/sdmaker/v1/jobs/{job}/events",
                           headers={"Last-Event-ID": str(events[2]["id"])}, timeout=30).text)
    assert again == events[3:]
    missing = httpx.get(f"{daemon.url}/sdmaker/v1/jobs/no-such-job/events", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"] == "JobNotFoundError"


def test_live_events_while_it_runs_and_a_caller_chosen_id(daemon, mini_endpoint) -> None:  # type: ignore[no-untyped-def]
    job = f"my-job-{time.time_ns()}"
    answer: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: answer.setdefault("r", _invoke(
        daemon, mini_endpoint, _body(num_inference_steps=6, seed=9), job_id=job)))
    thread.start()
    seen: list[dict] = []
    with httpx.Client(timeout=60) as client:
        for _ in range(200):  # the job exists once the daemon has the request
            r = client.get(f"{daemon.url}/sdmaker/v1/jobs/{job}/events", headers={"Accept": "text/event-stream"})
            if r.status_code != 404:
                break
            time.sleep(0.02)
        # read a few events live, drop the connection, resume from the last one seen
        with client.stream("GET", f"{daemon.url}/sdmaker/v1/jobs/{job}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            buffer = ""
            for piece in stream.iter_text():
                buffer += piece
                seen = _sse(buffer.rsplit("\n\n", 1)[0] + "\n\n") if "\n\n" in buffer else []
                if len(seen) >= 3:
                    break
        rest = _sse(client.get(f"{daemon.url}/sdmaker/v1/jobs/{job}/events",
                               headers={"Last-Event-ID": str(seen[-1]["id"])}).text)
    thread.join(120)
    assert answer["r"].headers["X-Sdmaker-Job-Id"] == job
    ids = [e["id"] for e in seen + rest]
    assert ids == list(range(1, len(ids) + 1))  # nothing lost, nothing twice
    assert rest[-1]["event"] == "done", rest[-1]
    assert len([e for e in seen + rest if e["event"] == "step"]) == 6
    reused = _invoke(daemon, mini_endpoint, _body(), job_id=job)
    assert reused.status_code == 400 and "already in use" in reused.json()["message"]


def test_previews_leave_the_image_bit_identical(daemon, mini_endpoint) -> None:  # type: ignore[no-untyped-def]
    plain = _invoke(daemon, mini_endpoint, _body(seed=21)).json()
    approx = _invoke(daemon, mini_endpoint, _body(seed=21, preview="approx")).json()
    vae = _invoke(daemon, mini_endpoint, _body(seed=21, preview="vae", preview_every=1)).json()
    assert plain["generated_images"] == approx["generated_images"] == vae["generated_images"]


def test_boto3_response_stream_gets_progress_lines_then_the_result(daemon, mini_endpoint) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    response = rt.invoke_endpoint_with_response_stream(
        EndpointName=mini_endpoint, ContentType="application/json", Accept="application/json",
        Body=_body(seed=33, preview="approx", preview_every=2))
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    parts = [event["PayloadPart"]["Bytes"] for event in response["Body"]]
    lines = [json.loads(p) for p in parts[:-1]]
    assert [x["type"] for x in lines][:2] == ["queued", "started"]
    assert [x["step"] for x in lines if x["type"] == "step"] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if x["type"] == "preview"] == [2]
    job = response["ResponseMetadata"]["HTTPHeaders"]["x-sdmaker-job-id"]
    assert {x["job_id"] for x in lines} == {job}
    result = json.loads(parts[-1])
    same = _invoke(daemon, mini_endpoint, _body(seed=33)).json()
    assert result["generated_images"] == same["generated_images"]


def test_response_stream_errors(daemon, mini_endpoint, streaming_endpoint) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    with pytest.raises(ClientError) as err:  # before the stream: the runtime API's own error
        rt.invoke_endpoint_with_response_stream(EndpointName=mini_endpoint, ContentType="application/json",
                                                Body=_body(height=65))
    assert err.value.response["Error"]["Code"] == "ValidationError"
    with pytest.raises(ClientError) as err:
        rt.invoke_endpoint_with_response_stream(EndpointName="no-such-endpoint", Body=b"{}",
                                                ContentType="application/json")
    assert err.value.response["Error"]["Code"] == "ValidationError"
    response = rt.invoke_endpoint_with_response_stream(EndpointName=streaming_endpoint, ContentType="application/json",
                                                       Body=json.dumps({"n": 3, "fail_at": 2}).encode())
    got: list[bytes] = []
    with pytest.raises(EventStreamError) as stream_err:
        for event in response["Body"]:
            got.append(event["PayloadPart"]["Bytes"])
    assert "ModelStreamError" in str(stream_err.value) and "broke at chunk 2" in str(stream_err.value)
    assert [json.loads(g) for g in got] == [{"chunk": 0}, {"chunk": 1}]


def test_generator_predict_fn_streams_its_chunks(daemon, streaming_endpoint) -> None:  # type: ignore[no-untyped-def]
    rt = daemon.boto("sagemaker-runtime")
    response = rt.invoke_endpoint_with_response_stream(EndpointName=streaming_endpoint, ContentType="application/json",
                                                       Body=json.dumps({"n": 3, "sleep": 0.3}).encode())
    arrivals: list[tuple[float, bytes]] = []
    for event in response["Body"]:
        arrivals.append((time.monotonic(), event["PayloadPart"]["Bytes"]))
    assert [json.loads(b) for _, b in arrivals] == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}]
    assert arrivals[-1][0] > arrivals[0][0]  # they came one by one, not in one piece
    # InvokeEndpoint gets the same chunks joined; a non-generator answer streams as one part
    whole = rt.invoke_endpoint(EndpointName=streaming_endpoint, ContentType="application/json",
                               Body=json.dumps({"n": 2}).encode())["Body"].read()
    assert whole == b'{"chunk":0}\n{"chunk":1}\n'
    plain = rt.invoke_endpoint_with_response_stream(EndpointName=streaming_endpoint, ContentType="application/json",
                                                    Body=json.dumps({"plain": True}).encode())
    assert [json.loads(e["PayloadPart"]["Bytes"]) for e in plain["Body"]] == [{"plain": True}]


def test_event_stream_framing_matches_botocore(tmp_path: Path) -> None:
    from botocore.eventstream import EventStreamBuffer

    from sdmaker.serving.daemon._stream_api import exception_event, payload_part

    buf = EventStreamBuffer()
    buf.add_data(payload_part(b"hello") + exception_event("ModelStreamError", "boom", "StreamBroken"))
    first, second = list(buf)
    assert first.payload == b"hello" and first.headers[":event-type"] == "PayloadPart"
    assert second.headers[":exception-type"] == "ModelStreamError"
    assert json.loads(second.payload) == {"Message": "boom", "ErrorCode": "StreamBroken"}


def test_client_generate_reports_progress_and_the_cli_invoke_shows_it(daemon, mini_endpoint, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sdmaker.client import Client

    events: list[dict] = []
    with Client(daemon.url) as client:
        gen = client.generate(mini_endpoint, "a red circle", height=64, width=64, num_inference_steps=3, seed=4,
                              on_progress=events.append)
        plain = client.generate(mini_endpoint, "a red circle", height=64, width=64, num_inference_steps=3, seed=4)
    assert gen.images == plain.images
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    monkeypatch.setenv("SDMAKER_URL", daemon.url)
    from typer.testing import CliRunner

    from sdmaker.cli import app

    result = CliRunner().invoke(app, ["invoke", mini_endpoint, "-p", "a red circle", "--height", "64", "--width", "64",
                                      "--num-inference-steps", "2", "--seed", "4", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob(f"{mini_endpoint}-00-seed4.*"))) == 1
