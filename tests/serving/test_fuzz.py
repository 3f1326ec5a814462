"""Bad input never gets a 5xx (issue 11): a Hypothesis-built fuzz corpus and the cases issue 11 saw.

Every malformed body, at every route -- the daemon's runtime API (``POST /endpoints/EP/invocations``),
its control plane (``POST /`` with ``X-Amz-Target``) and a worker (``sdmaker serve``'s ``POST
/invocations``) -- must get a 4xx in AWS's error shape for that surface (see
:func:`bench.reliability.error_shape_problems`), an error body that quotes at most a few hundred bytes
of the input, an answer at all (the socket timeout is a hang detector, not a latency target: the
100 ms target is measured by ``python -m bench --only reliability``), and a keep-alive connection that
still answers ``GET /ping`` afterwards.

The daemon and the worker are black boxes (HTTP only), so these tests hold across restructurings of
``sdmaker.serving``. The Hypothesis runs are deterministic (``derandomize=True``, fixed
``max_examples``, no example database) and collect every failing case instead of stopping at the
first, so one run lists all of them.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, _free_port, _wait_http
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.reliability import SMALL_REQUEST, Case, Reply, describe, error_shape_problems, seen_cases, send_case

ENDPOINT = "fz-ep"
#: a hang detector only (no timed assertions): a request unanswered this long counts as "no answer"
SOCKET_TIMEOUT_S = 60.0
#: the fields the default handler knows; anything else is an unknown field (refused: extra="forbid")
KNOWN_FIELDS = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                "num_images_per_prompt", "seed", "scheduler", "deep_cache_interval", "format", "quality",
                "inputs", "parameters")
#: a valid, cheap request: mutations change one thing, so an accidentally accepted body stays fast
BASE = {**SMALL_REQUEST, "num_inference_steps": 1}


# -- fixtures: a daemon with one default-handler endpoint, and a worker (`sdmaker serve`) ----------------


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory, sd1_dir: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("fuzz-home"), env={"HF_HUB_OFFLINE": "1"}).start()
    try:
        desc = d.deploy(ENDPOINT, sd1_dir)
        assert desc["EndpointStatus"] == "InService", desc.get("FailureReason")
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def fuzz_worker(tmp_path_factory: pytest.TempPathFactory, sd1_dir: Path) -> Iterator[int]:
    """``sdmaker serve`` on the tiny SD1 model: the port of a SageMaker-contract container."""
    home = tmp_path_factory.mktemp("fuzz-worker-home")
    port = _free_port()
    log = home / "serve.log"
    env = {**os.environ, "SDMAKER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "serve", str(sd1_dir), "--port", str(port)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600.0) -> None:
    import time

    import httpx

    _wait_http(url, proc, timeout_s)  # answers at all (503 while loading)
    deadline = time.monotonic() + timeout_s
    while httpx.get(url, timeout=5).status_code != 200:
        assert proc.poll() is None and time.monotonic() < deadline, "the worker did not load the model"
        time.sleep(0.2)


def _conn(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT_S)


def _failure(case: Case, reply: Reply) -> str | None:
    problems = error_shape_problems(case, reply)
    if not problems:
        return None
    return f"{case.label} [{case.content_type}] body {case.body[:80]!r}: {'; '.join(problems)} <- {describe(reply)}"


# -- the cases issue 11 saw, one test each ---------------------------------------------------------------


_SEEN = seen_cases(big=True)
_SEEN_RUNTIME = [c for c in _SEEN if c.surface == "runtime"]


@pytest.mark.parametrize("case", [c for c in _SEEN if c.surface in ("runtime", "control")], ids=lambda c: c.label)
def test_seen_malformed_request_gets_a_clean_4xx_at_the_daemon(fuzz_daemon: DaemonProcess, case: Case) -> None:
    conn = _conn(fuzz_daemon.port)
    try:
        reply = send_case(conn, case, ENDPOINT)
    finally:
        conn.close()
    assert _failure(case, reply) is None, _failure(case, reply)


@pytest.mark.parametrize("case", [Case(c.label.replace("runtime:", "worker:"), "worker", c.body, c.content_type)
                                  for c in _SEEN_RUNTIME], ids=lambda c: c.label)
def test_seen_malformed_request_gets_a_clean_4xx_at_the_worker(fuzz_worker: int, case: Case) -> None:
    conn = _conn(fuzz_worker)
    try:
        reply = send_case(conn, case)
    finally:
        conn.close()
    assert _failure(case, reply) is None, _failure(case, reply)


def test_a_valid_request_still_works_after_the_seen_cases(fuzz_daemon: DaemonProcess) -> None:
    """The corpus is not trivially "everything fails": the same endpoint answers a valid body with 200."""
    conn = _conn(fuzz_daemon.port)
    try:
        ok = Case("valid", "runtime", json.dumps(BASE).encode())
        reply = send_case(conn, ok, ENDPOINT)
    finally:
        conn.close()
    assert reply.status == 200, describe(reply)
    assert reply.connection_reusable
    assert len(json.loads(reply.body)["generated_images"]) == 1


# -- Hypothesis strategies: malformed bodies -------------------------------------------------------------


def _with_raw(field: str, raw: str, base: dict[str, Any] | None = None) -> bytes:
    """``base`` without ``field``, plus ``"field": raw`` spliced in as raw JSON text (kept verbatim)."""
    rest = {k: v for k, v in (base or BASE).items() if k != field}
    text = json.dumps(rest)
    return (text[:-1] + (", " if rest else "") + json.dumps(field) + ": " + raw + "}").encode()


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                          st.text(max_size=10))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                   st.dictionaries(st.text(max_size=5), inner,
                                                                                   max_size=3)), max_leaves=6)
#: values that are never a JSON integer: strings (including "64"), booleans, floats (including 64.0, -0.0)
_not_int = st.one_of(
    st.text(max_size=8).map(json.dumps),
    st.booleans().map(json.dumps),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(float(f))),
    st.sampled_from(["-0.0", "1e-400", "64.0", "6.4e1", "1e400", "-1e400", "NaN", "Infinity", "64e0"]),
    st.lists(st.integers(-5, 100), max_size=2).map(json.dumps),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1).map(json.dumps),
)


def _int_outside(lo: int, hi: int, multiple: int = 1) -> st.SearchStrategy[str]:
    return st.integers(min_value=-(2**80), max_value=2**80).filter(
        lambda v: v < lo or v > hi or v % multiple != 0).map(str)


_not_text = st.one_of(st.integers().map(str), st.booleans().map(json.dumps), st.just("null"),
                      st.dictionaries(st.text(max_size=3), st.text(max_size=3), min_size=0, max_size=2).map(json.dumps),
                      st.lists(st.one_of(st.integers(), st.none(), st.booleans()), min_size=1, max_size=3).map(json.dumps),
                      st.just("[]"))
_lone_surrogate = st.integers(0xD800, 0xDFFF).map(lambda c: json.dumps("a" + chr(c) + "b"))
_too_long = st.integers(4001, 9000).map(lambda n: json.dumps("p" * n))

#: field -> strategy of raw JSON text for a wrong value of it
_BAD_FIELD: dict[str, st.SearchStrategy[str]] = {
    "height": st.one_of(_not_int, _int_outside(64, 2048, 8)),
    "width": st.one_of(_not_int, _int_outside(64, 2048, 8)),
    "num_inference_steps": st.one_of(_not_int, _int_outside(1, 500)),
    "num_images_per_prompt": st.one_of(_not_int, _int_outside(1, 16)),
    "seed": st.one_of(_not_int, _int_outside(0, 2**63 - 1)),
    "quality": st.one_of(_not_int, _int_outside(1, 100), st.just("null")),
    "deep_cache_interval": st.one_of(_not_int, _int_outside(0, 10)),
    "guidance_scale": st.one_of(st.text(max_size=6).map(json.dumps), st.booleans().map(json.dumps),
                                st.floats(min_value=50.001, allow_infinity=False, allow_nan=False).map(repr),
                                st.floats(max_value=-0.001, allow_infinity=False, allow_nan=False).map(repr),
                                st.sampled_from(["NaN", "Infinity", "-Infinity", "[7.5]"])),
    "prompt": st.one_of(_not_text, _lone_surrogate, _too_long,
                        st.integers(17, 40).map(lambda n: json.dumps(["a"] * n))),
    "negative_prompt": st.one_of(_not_text.filter(lambda t: t != "null"), _lone_surrogate, _too_long,
                                 st.just('["a", "b"]')),
    "scheduler": st.one_of(_not_text.filter(lambda t: t != "null"),
                           st.text(max_size=10).filter(lambda s: s not in ("ddim", "pndm", "euler", "euler_a",
                                                                           "dpmpp_2m", "unipc", "lms", "heun", "ddpm"))
                           .map(json.dumps)),
    "format": st.one_of(_not_text, st.text(max_size=6).filter(lambda s: s not in ("jpeg", "png", "webp")).map(json.dumps)),
}


@st.composite
def _field_case(draw: st.DrawFn) -> tuple[str | None, bytes, str]:
    field = draw(st.sampled_from(sorted(_BAD_FIELD)))
    raw = draw(_BAD_FIELD[field])
    if draw(st.booleans()) and field != "prompt":  # the Hugging Face toolkit's {"inputs", "parameters"} shape
        params = {k: v for k, v in BASE.items() if k not in ("prompt", field)}
        body = (json.dumps({"inputs": BASE["prompt"]})[:-1] + ', "parameters": '
                + _with_raw(field, raw, params).decode() + "}").encode()
        return "application/json", body, f"parameters.{field}={raw[:40]}"
    return "application/json", _with_raw(field, raw), f"{field}={raw[:40]}"


_unknown_key = st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_FIELDS)


@st.composite
def _unknown_field_case(draw: st.DrawFn) -> tuple[str | None, bytes, str]:
    key = draw(_unknown_key)
    value = draw(_json_values)
    return "application/json", json.dumps({**BASE, key: value}).encode(), f"unknown field {key[:20]!r}"


@st.composite
def _shape_case(draw: st.DrawFn) -> tuple[str | None, bytes, str]:
    """A JSON document that is not an object, or an object with the wrong top-level structure."""
    value = draw(st.one_of(
        _json_scalars, st.lists(_json_values, max_size=3),
        st.builds(lambda v: {"inputs": BASE["prompt"], "parameters": v},
                  st.one_of(st.lists(_json_scalars, min_size=1, max_size=2), st.integers(), st.text(min_size=1))),
        st.builds(lambda p: {"inputs": p, "prompt": p}, st.text(min_size=1, max_size=5)),
        st.dictionaries(_unknown_key, _json_values, max_size=3),  # no prompt at all
    ))
    return "application/json", json.dumps(value).encode(), f"shape {json.dumps(value)[:40]}"


@st.composite
def _syntax_case(draw: st.DrawFn) -> tuple[str | None, bytes, str]:
    """Broken JSON: a valid body cut short, or bytes that do not parse."""
    valid = json.dumps(BASE).encode()
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(valid) - 1))
        return "application/json", valid[:cut], f"truncated at {cut}"
    junk = draw(st.binary(min_size=1, max_size=64).filter(_not_json))
    return "application/json", junk, "junk bytes"


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return True
    return False


@st.composite
def _deep_case(draw: st.DrawFn) -> tuple[str | None, bytes, str]:
    depth = draw(st.integers(200, 4000))
    where = draw(st.sampled_from(["array", "object", "prompt", "parameters"]))
    inner = b"[" * depth + b"]" * depth if where != "object" else b'{"a":' * depth + b"1" + b"}" * depth
    if where == "prompt":
        inner = b'{"prompt": ' + inner + b"}"
    elif where == "parameters":
        inner = b'{"inputs": "a", "parameters": {"x": ' + inner + b"}}"
    return "application/json", inner, f"nested {where} depth {depth}"


_BAD_TYPES = ("text/plain", "application/octet-stream", "application/xml", "multipart/form-data; boundary=x",
              "application/x-www-form-urlencoded", "image/png", "image/jpeg", "application/x-npy", "text/csv",
              "application/json; charset=utf-16", "application/json; charset=utf-32",
              "text/html", "")


@st.composite
def _encoding_case(draw: st.DrawFn) -> tuple[str | None, bytes, str]:
    """A body whose content type the default handler cannot take as a text-to-image request."""
    ctype = draw(st.sampled_from(_BAD_TYPES))
    if "charset=" in ctype:
        prompt = draw(st.text(min_size=1, max_size=10))
        encoding = ctype.split("=", 1)[1]
        try:
            body = json.dumps({**BASE, "prompt": prompt}, ensure_ascii=False).encode(encoding)
        except UnicodeEncodeError:
            body = json.dumps(BASE).encode(encoding)
    elif ctype == "text/csv":
        body = draw(st.text(max_size=30).filter(lambda t: not any(h in (t.splitlines() or [""])[0].lower()
                                                                  for h in ("question", "context", "inputs"))).map(str.encode))
    else:
        body = draw(st.one_of(st.binary(max_size=64), st.just(json.dumps(BASE).encode())))
    return ctype or None, body, f"content type {ctype!r}"


_runtime_bodies = st.one_of(_field_case(), _field_case(), _field_case(), _unknown_field_case(), _shape_case(),
                            _syntax_case(), _deep_case(), _encoding_case())

# control plane: one member of a valid-looking call made wrong ------------------------------------------

_OPS: dict[str, dict[str, Any]] = {
    "CreateModel": {"ModelName": "zz-fuzz-m", "ExecutionRoleArn": "arn:aws:iam::111122223333:role/r",
                    "PrimaryContainer": {"Image": "i", "ModelDataUrl": "zz-none", "Environment": {"A": "b"}}},
    "DescribeModel": {"ModelName": "zz-fuzz-m"},
    "DeleteModel": {"ModelName": "zz-fuzz-m"},
    "CreateEndpointConfig": {"EndpointConfigName": "zz-fuzz-c", "ProductionVariants": [
        {"VariantName": "v", "ModelName": "zz-none", "InitialInstanceCount": 1, "InstanceType": "ml.m5.large",
         "InitialVariantWeight": 1.0}]},
    "DescribeEndpointConfig": {"EndpointConfigName": "zz-fuzz-c"},
    "DeleteEndpointConfig": {"EndpointConfigName": "zz-fuzz-c"},
    "CreateEndpoint": {"EndpointName": "zz-fuzz-e", "EndpointConfigName": "zz-none"},
    "DescribeEndpoint": {"EndpointName": "zz-fuzz-e"},
    "DeleteEndpoint": {"EndpointName": "zz-fuzz-e"},
    "UpdateEndpoint": {"EndpointName": "zz-fuzz-e", "EndpointConfigName": "zz-none"},
    "ListEndpoints": {"MaxResults": 10, "SortBy": "Name", "SortOrder": "Ascending", "NameContains": "x",
                      "StatusEquals": "InService"},
}
#: the shape each member must have; a drawn value of another shape is malformed
_WRONG_FOR: dict[type, st.SearchStrategy[Any]] = {
    str: st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                   st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.floats(allow_nan=False)),
    int: st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2), st.floats(allow_nan=False)
                   .filter(lambda f: f != int(f) if abs(f) < 1e300 else True), st.integers(max_value=0),
                   st.integers(min_value=101)),
    float: st.one_of(st.text(max_size=5), st.lists(st.floats(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                            st.integers(), max_size=1)),
    dict: st.one_of(st.text(max_size=5), st.integers(), st.lists(_json_scalars, max_size=2), st.booleans()),
    list: st.one_of(st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                    st.lists(st.one_of(st.none(), st.text(max_size=3), st.integers()), min_size=1, max_size=3),
                    st.just([])),
}
#: members whose *string* values are also wrong (names with a pattern, enums, opaque tokens)
_BAD_STRING: dict[str, st.SearchStrategy[str]] = {
    "ModelName": st.sampled_from(["", "-a", "a b", "x" * 64, "\ud800", "a_b"]),
    "EndpointConfigName": st.sampled_from(["", "-a", "a b", "x" * 64, "\ud800"]),
    "EndpointName": st.sampled_from(["", "-a", "a b", "x" * 64, "\udfff"]),
    "SortBy": st.text(max_size=8).filter(lambda s: s not in ("Name", "CreationTime", "Status")),
    "SortOrder": st.text(max_size=8).filter(lambda s: s not in ("Ascending", "Descending")),
    "StatusEquals": st.text(max_size=8).filter(lambda s: s not in ("OutOfService", "Creating", "Updating",
                                                                   "SystemUpdating", "RollingBack", "InService",
                                                                   "Deleting", "Failed", "UpdateRollbackFailed")),
    "NextToken": st.text(min_size=1, max_size=8).filter(lambda s: not s.isdigit()),
}


@st.composite
def _mutated(draw: st.DrawFn, value: Any, key: str | None = None) -> Any:
    """``value`` with one member (at any depth) replaced by a value of the wrong shape."""
    if isinstance(value, (dict, list)) and key is not None and draw(st.integers(0, 3)) == 0:
        return draw(_WRONG_FOR[type(value)])  # the whole member of the wrong shape
    if isinstance(value, dict) and value:
        k = draw(st.sampled_from(sorted(value)))
        return {**value, k: draw(_mutated(value[k], k))}
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(_mutated(value[i], key)), *value[i + 1:]]
    kind = type(value) if not isinstance(value, bool) else bool
    if kind is str and key in _BAD_STRING and draw(st.booleans()):
        return draw(_BAD_STRING[key])
    return draw(_WRONG_FOR.get(kind, st.none()))


@st.composite
def _control_case(draw: st.DrawFn) -> Case:
    op = draw(st.sampled_from(sorted(_OPS)))
    how = draw(st.sampled_from(["member", "member", "member", "truncated", "not an object", "deep"]))
    if how == "member":
        body = json.dumps(draw(_mutated(_OPS[op]))).encode()
    elif how == "truncated":
        valid = json.dumps(_OPS[op]).encode()
        body = valid[:draw(st.integers(0, len(valid) - 1))] or b"{"
    elif how == "not an object":
        body = json.dumps(draw(st.one_of(_json_scalars.filter(lambda v: v is not None),
                                         st.lists(_json_values, max_size=2)))).encode()
    else:
        depth = draw(st.integers(200, 4000))
        body = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    return Case(f"control: {op} {how}", "control", body, target=op)


# -- the fuzz runs ---------------------------------------------------------------------------------------

_FUZZ = settings(derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=list(HealthCheck), print_blob=False)


def _run_corpus(strategy: st.SearchStrategy[Case], examples: int, check: Callable[[Case], str | None]) -> None:
    """Run ``examples`` cases drawn from ``strategy``; fail once at the end listing every failing case."""
    failures: list[str] = []
    seen: list[int] = [0]

    @settings(_FUZZ, max_examples=examples)
    @given(case=strategy)
    def one(case: Case) -> None:
        seen[0] += 1
        problem = check(case)
        if problem is not None:
            failures.append(problem)

    one()
    assert seen[0] >= examples * 0.9, f"only {seen[0]} cases ran"
    assert not failures, f"{len(failures)} of {seen[0]} malformed requests were not a clean 4xx:\n" + "\n".join(
        failures[:60])


def _checker(port: int, endpoint: str = "") -> Callable[[Case], str | None]:
    state = {"conn": _conn(port)}

    def check(case: Case) -> str | None:
        reply = send_case(state["conn"], case, endpoint)
        if not reply.connection_reusable:
            state["conn"].close()
            state["conn"] = _conn(port)
        return _failure(case, reply)

    return check


@pytest.mark.slow
def test_fuzz_runtime_api(fuzz_daemon: DaemonProcess) -> None:
    """250 malformed InvokeEndpoint bodies at a default-handler endpoint: each a clean 400, never 424/5xx."""
    cases = _runtime_bodies.map(lambda t: Case(f"runtime: {t[2]}", "runtime", t[1], t[0]))
    _run_corpus(cases, 250, _checker(fuzz_daemon.port, ENDPOINT))


@pytest.mark.slow
def test_fuzz_control_plane(fuzz_daemon: DaemonProcess) -> None:
    """200 malformed control-plane calls (every operation): each a clean JSON 1.1 4xx."""
    _run_corpus(_control_case(), 200, _checker(fuzz_daemon.port))


@pytest.mark.slow
def test_fuzz_worker(fuzz_worker: int) -> None:
    """150 malformed bodies at a worker's /invocations: each a 4xx in the container's error shape."""
    cases = _runtime_bodies.map(lambda t: Case(f"worker: {t[2]}", "worker", t[1], t[0]))
    _run_corpus(cases, 150, _checker(fuzz_worker))
