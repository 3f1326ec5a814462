"""Reliability benchmark (issue 11): bad input, floods, a huge request, dying workers and SIGTERM.

The daemon is a black box here: ``sdmaker up`` in its own temp ``SDMAKER_HOME`` on a free 127.0.0.1
port, endpoints made with the ``sdmaker endpoint create`` CLI on the built-in ``mini`` model, driven
over HTTP only (raw sockets and httpx, never boto3's retries), worker pids read from the daemon's own
``GET /sdmaker/v1/endpoints/NAME``. Nothing from ``sdmaker.serving`` is imported, so the module keeps
measuring while the serving package is restructured. Rows (targets from issue 11 in the notes):

* malformed requests -- a fixed corpus (:func:`seen_cases`: the cases issue 11 saw) plus seeded random
  mutations of valid bodies (:func:`generated_cases`) at the runtime API and the control plane: count
  of 5xx (target 0), p99 rejection time (target <= 100 ms), and how many left the keep-alive
  connection unusable (target 0). A 424 for a default-handler endpoint counts as a miss too: its
  validation belongs to the daemon.
* flood -- 64 concurrent clients, one request each, on one ``mini`` endpoint at default settings
  (queue 100, batch 8, 60 s timeout); each request sized so the flood is several times what the
  endpoint can finish within its timeout. Served / 503 with Retry-After / lost (no answer, 424, other
  5xx) / answers later than the timeout, and the max latency.
* huge request beside small ones -- small requests' latency while one huge request runs, vs alone.
* worker kills -- K x ``kill -9`` of a busy worker of a 2-worker endpoint under steady load: requests
  lost (target 0) and recovery time.
* SIGTERM drain -- SIGTERM to the daemon with N requests in flight: seconds until it exits (target
  <= 30 s), answers that were clean (200 or an AWS-shaped error) vs bare 500s / dropped connections,
  whether a request sent during the drain got 503, and whether the pid file was removed.

``python -m bench --only reliability [--quick]``; ``python -m bench.reliability --quick`` prints the rows.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import row
from bench._daemon import BenchDaemon

__all__ = ["Case", "Reply", "error_shape_problems", "generated_cases", "huge_png", "run", "seen_cases", "send"]

ENDPOINT_TIMEOUT_S = 60.0  # the daemon's default invocation timeout (and SageMaker's)
TARGET_P99_MS = 100.0
TARGET_DRAIN_S = 30.0
#: an error body may quote a few hundred bytes of the input, not all of it (issue 11, "Bounded resources")
MAX_ERROR_BODY_BYTES = 4096
SMALL_REQUEST = {"prompt": "a red circle on a white background", "height": 64, "width": 64, "num_inference_steps": 10,
                 "seed": 1}
_MIB = 1024 * 1024


# -- the malformed corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One HTTP request: ``surface`` is ``runtime`` (``/endpoints/EP/invocations``), ``control`` (``POST /``
    with ``X-Amz-Target``) or ``worker`` (a container's ``/invocations``)."""

    label: str
    surface: str
    body: bytes
    content_type: str | None = "application/json"
    target: str | None = None  # control plane operation

    def path(self, endpoint: str) -> str:
        if self.surface == "runtime":
            return f"/endpoints/{endpoint}/invocations"
        if self.surface == "worker":
            return "/invocations"
        return "/"

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.content_type is not None:
            out["Content-Type"] = self.content_type
        if self.surface == "control":
            out["X-Amz-Target"] = f"SageMaker.{self.target}"
            out.setdefault("Content-Type", "application/x-amz-json-1.1")
        if self.surface in ("runtime", "worker"):
            out["Accept"] = "application/json"
        return out


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def huge_png(width: int = 17000, height: int = 10000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` (all black): ~160 KB that decodes to ~0.5 GB RGB.

    Built by hand (zlib over rows of zero bytes), so making it never allocates the decoded image.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # depth 1, gray
    line = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(line * 500) for _ in range(height // 500)]
    parts.append(comp.compress(line * (height % 500)))
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def seen_cases(*, big: bool = True) -> list[Case]:
    """The malformed requests issue 11 saw (item 3) and their neighbours, one :class:`Case` each.

    ``big``: include the multi-megabyte bodies (6 MiB prompt, 17000x10000 PNG).
    """
    ok = {**SMALL_REQUEST, "num_inference_steps": 1}  # cheap when a server wrongly accepts a neighbouring case
    rt: list[Case] = [
        Case("runtime: deep JSON array depth 1000", "runtime", _deep(1000)),
        Case("runtime: deep JSON object depth 1000", "runtime", b'{"a":' * 1000 + b"1" + b"}" * 1000),
        Case("runtime: prompt nested 1000 deep", "runtime", b'{"prompt": ' + _deep(1000) + b"}"),
        Case("runtime: lone surrogate prompt", "runtime", b'{"prompt": "\\ud800", "height": 64, "width": 64}'),
        Case("runtime: lone low surrogate in a list", "runtime", b'{"prompt": ["a", "\\udfff"]}'),
        Case("runtime: charset=utf-16 body", "runtime", json.dumps(ok).encode("utf-16"),
             "application/json; charset=utf-16"),
        Case("runtime: utf-16 body labelled plain JSON", "runtime", json.dumps(ok).encode("utf-16")),
        Case("runtime: invalid UTF-8", "runtime", b'{"prompt": "\xff\xfe"}'),
        Case("runtime: not JSON", "runtime", b"prompt=a+cat"),
        Case("runtime: empty body", "runtime", b""),
        Case("runtime: JSON null", "runtime", b"null"),
        Case("runtime: JSON list", "runtime", b'["a cat"]'),
        Case("runtime: JSON string", "runtime", b'"a cat"'),
        Case("runtime: NaN guidance", "runtime", b'{"prompt": "a", "guidance_scale": NaN}'),
        Case("runtime: height \"64\"", "runtime", _j({**ok, "height": "64"})),
        Case("runtime: num_images_per_prompt true", "runtime", _j({**ok, "num_images_per_prompt": True})),
        Case("runtime: steps -0.0", "runtime", b'{"prompt": "a", "height": 64, "width": 64, "num_inference_steps": -0.0}'),
        Case("runtime: seed 1e-400", "runtime", b'{"prompt": "a", "height": 64, "width": 64, "seed": 1e-400}'),
        Case("runtime: height 64.0", "runtime", b'{"prompt": "a", "height": 64.0, "width": 64}'),
        Case("runtime: seed \"1\"", "runtime", _j({**ok, "seed": "1"})),
        Case("runtime: quality true", "runtime", _j({**ok, "quality": True})),
        Case("runtime: height 65", "runtime", _j({**ok, "height": 65})),
        Case("runtime: steps 0", "runtime", _j({**ok, "num_inference_steps": 0})),
        Case("runtime: seed -1", "runtime", _j({**ok, "seed": -1})),
        Case("runtime: seed 2**64", "runtime", _j({**ok, "seed": 2**64})),
        Case("runtime: prompt 4001 chars", "runtime", _j({**ok, "prompt": "a" * 4001})),
        Case("runtime: prompt int", "runtime", _j({**ok, "prompt": 5})),
        Case("runtime: prompt dict", "runtime", _j({**ok, "prompt": {"a": 1}})),
        Case("runtime: prompt [null]", "runtime", _j({**ok, "prompt": [None]})),
        Case("runtime: no prompt", "runtime", _j({"height": 64})),
        Case("runtime: unknown field", "runtime", _j({**ok, "heigth": 64})),
        Case("runtime: scheduler bogus", "runtime", _j({**ok, "scheduler": "bogus"})),
        Case("runtime: format gif", "runtime", _j({**ok, "format": "gif"})),
        Case("runtime: parameters list", "runtime", _j({"inputs": "a", "parameters": [1]})),
        Case("runtime: inputs and prompt", "runtime", _j({"inputs": "a", "prompt": "b"})),
        Case("runtime: text/plain garbage", "runtime", b"\x00\x01garbage", "text/plain"),
        Case("runtime: image/png garbage", "runtime", b"not a png", "image/png"),
        Case("runtime: application/x-www-form-urlencoded", "runtime", b"prompt=a", "application/x-www-form-urlencoded"),
        Case("runtime: no Content-Type", "runtime", b"{}", None),
        Case("runtime: 33 images", "runtime", _j({**ok, "prompt": ["a"] * 11, "num_images_per_prompt": 3})),
        Case("runtime: pixels over the limit", "runtime", _j({**ok, "height": 2048, "width": 2048})),
    ]
    cp: list[Case] = [
        Case("control: CreateEndpointConfig ProductionVariants [\"x\"]", "control",
             _j({"EndpointConfigName": "zz-fuzz", "ProductionVariants": ["x"]}), target="CreateEndpointConfig"),
        Case("control: CreateEndpointConfig ProductionVariants [null]", "control",
             _j({"EndpointConfigName": "zz-fuzz", "ProductionVariants": [None]}), target="CreateEndpointConfig"),
        Case("control: CreateEndpointConfig ModelName [\"a\"]", "control",
             _j({"EndpointConfigName": "zz-fuzz", "ProductionVariants": [{"ModelName": ["a"]}]}),
             target="CreateEndpointConfig"),
        Case("control: CreateEndpointConfig ProductionVariants {}", "control",
             _j({"EndpointConfigName": "zz-fuzz", "ProductionVariants": {}}), target="CreateEndpointConfig"),
        Case("control: CreateEndpointConfig InitialInstanceCount \"x\"", "control",
             _j({"EndpointConfigName": "zz-fuzz", "ProductionVariants": [
                 {"ModelName": "zz-none", "VariantName": "v", "InitialInstanceCount": "x"}]}),
             target="CreateEndpointConfig"),
        Case("control: ListEndpoints MaxResults \"x\"", "control", _j({"MaxResults": "x"}), target="ListEndpoints"),
        Case("control: ListEndpoints SortBy []", "control", _j({"SortBy": []}), target="ListEndpoints"),
        Case("control: ListEndpoints NextToken \"abc\"", "control", _j({"NextToken": "abc"}), target="ListEndpoints"),
        Case("control: ListEndpoints MaxResults -1", "control", _j({"MaxResults": -1}), target="ListEndpoints"),
        Case("control: ListEndpoints MaxResults 1e9", "control", _j({"MaxResults": 10**9}), target="ListEndpoints"),
        Case("control: ListEndpoints NameContains {}", "control", _j({"NameContains": {}}), target="ListEndpoints"),
        Case("control: DescribeEndpoint EndpointName []", "control", _j({"EndpointName": []}), target="DescribeEndpoint"),
        Case("control: CreateModel PrimaryContainer \"x\"", "control",
             _j({"ModelName": "zz-fuzz", "PrimaryContainer": "x"}), target="CreateModel"),
        Case("control: CreateModel Environment [1]", "control",
             _j({"ModelName": "zz-fuzz", "PrimaryContainer": {"Image": "i", "ModelDataUrl": "zz-none",
                                                               "Environment": [1]}}), target="CreateModel"),
        Case("control: CreateModel Containers [7]", "control", _j({"ModelName": "zz-fuzz", "Containers": [7]}),
             target="CreateModel"),
        Case("control: deep JSON depth 1000", "control", b'{"a":' + _deep(1000) + b"}", target="ListEndpoints"),
        Case("control: lone surrogate name", "control", b'{"EndpointName": "\\ud800"}', target="DescribeEndpoint"),
        Case("control: not JSON", "control", b"{", target="ListEndpoints"),
        Case("control: invalid UTF-8", "control", b'{"EndpointName": "\xff"}', target="DescribeEndpoint"),
        Case("control: JSON list", "control", b"[]", target="ListEndpoints"),
        Case("control: unknown operation", "control", b"{}", target="Bogus"),
    ]
    out = rt + cp
    if big:
        out += [
            Case("runtime: 6 MiB prompt (under the 6 MiB body limit)", "runtime",
                 _j({**ok, "prompt": "a" * (6 * _MIB - 200)})),
            Case("runtime: 6 MiB + 1 body", "runtime", b" " * (6 * _MIB + 1)),
            Case("runtime: 17000x10000 PNG as image/png", "runtime", huge_png(), "image/png"),
        ]
    return out


#: wrong values per field kind; every one of them must be refused
_BAD_INT: list[Any] = ["64", "", "1e3", True, False, -0.0, 0.5, 64.0, 1e-400, 1e400, [64], {"v": 64}, 2**70, -(2**70)]
_BAD_FLOAT: list[Any] = ["7.5", True, [7.5], {"v": 1}, -1, 51, 1e400]
_BAD_STR: list[Any] = [5, 1.5, True, [], [None], {"a": "b"}, "\ud800", "x" * 5000]
_FIELDS = {"height": _BAD_INT + [65, 0, -64, 4096], "width": _BAD_INT + [63, 2056],
           "num_inference_steps": _BAD_INT + [0, -1, 501], "num_images_per_prompt": _BAD_INT + [0, 17],
           "seed": _BAD_INT + [-1, 2**63], "quality": _BAD_INT + [0, 101, None], "deep_cache_interval": _BAD_INT + [-1, 11],
           "guidance_scale": _BAD_FLOAT, "prompt": _BAD_STR + [None, ["a"] * 17], "negative_prompt": _BAD_STR + [["a", "b"]],
           "scheduler": _BAD_STR + ["bogus", "DDIM"], "format": _BAD_STR + ["gif", "PNG"]}
_CONTROL: dict[str, dict[str, Any]] = {
    "CreateModel": {"ModelName": "zz-fuzz-m", "PrimaryContainer": {"Image": "i", "ModelDataUrl": "zz-none"}},
    "DescribeModel": {"ModelName": "zz-fuzz-m"},
    "DeleteModel": {"ModelName": "zz-fuzz-m"},
    "CreateEndpointConfig": {"EndpointConfigName": "zz-fuzz-c", "ProductionVariants": [
        {"VariantName": "v", "ModelName": "zz-none", "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}]},
    "DescribeEndpointConfig": {"EndpointConfigName": "zz-fuzz-c"},
    "DeleteEndpointConfig": {"EndpointConfigName": "zz-fuzz-c"},
    "CreateEndpoint": {"EndpointName": "zz-fuzz-e", "EndpointConfigName": "zz-none"},
    "DescribeEndpoint": {"EndpointName": "zz-fuzz-e"},
    "DeleteEndpoint": {"EndpointName": "zz-fuzz-e"},
    "UpdateEndpoint": {"EndpointName": "zz-fuzz-e", "EndpointConfigName": "zz-none"},
    "ListEndpoints": {"MaxResults": 10, "SortBy": "Name", "SortOrder": "Ascending", "NameContains": "x"},
}
_BAD_ANY: list[Any] = [None, 5, 1.5, True, [], [None], ["x"], {}, {"a": ["b"]}, "", "\ud800", "x" * 300]


def _dumps(value: Any) -> bytes:
    """JSON with lone surrogates kept (as ``\\udXXX`` escapes) and NaN/Infinity as Python writes them."""
    return json.dumps(value, ensure_ascii=True).encode()


def _mutate_control(rng: random.Random, body: Any, depth: int = 0) -> Any:
    """``body`` with one member (at any depth) replaced by a wrong value."""
    if isinstance(body, dict) and body and (depth == 0 or rng.random() < 0.7):
        key = rng.choice(sorted(body))
        out = dict(body)
        child = body[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.5:
            out[key] = _mutate_control(rng, child, depth + 1)
        else:
            out[key] = rng.choice([v for v in _BAD_ANY if v != child])
        return out
    if isinstance(body, list) and body:
        i = rng.randrange(len(body))
        out_list = list(body)
        out_list[i] = _mutate_control(rng, body[i], depth + 1) if isinstance(body[i], dict) else rng.choice(_BAD_ANY)
        return out_list
    return rng.choice(_BAD_ANY)


def generated_cases(n: int, *, seed: int = 11, surfaces: tuple[str, ...] = ("runtime", "control")) -> list[Case]:
    """``n`` seeded malformed requests: a valid body with one field made wrong, or a broken encoding."""
    rng = random.Random(seed)
    out: list[Case] = []
    while len(out) < n:
        surface = rng.choice(surfaces)
        kind = rng.random()
        if surface == "control":
            op = rng.choice(sorted(_CONTROL))
            if kind < 0.85:
                body = _mutate_control(rng, _CONTROL[op])
                out.append(Case(f"control: {op} one member wrong", "control", _dumps(body), target=op))
            else:
                raw = _dumps(_CONTROL[op])
                out.append(Case(f"control: {op} truncated JSON", "control", raw[:rng.randrange(len(raw))], target=op))
            continue
        base = dict(SMALL_REQUEST)
        if kind < 0.75:
            name = rng.choice(sorted(_FIELDS))
            value = rng.choice(_FIELDS[name])
            body = {**base, name: value}
            if rng.random() < 0.2:  # the Hugging Face toolkit's shape
                body = {"inputs": body.pop("prompt"), "parameters": body}
            raw = b'{"prompt": "a", "height": 64, "width": 64, "' + name.encode() + b'": 1e-400}' \
                if value == 1e-400 else _dumps(body)
            out.append(Case(f"runtime: {name}={value!r:.40}", surface, raw))
        elif kind < 0.85:
            extra = "".join(rng.choice("abcdefghxyz_") for _ in range(rng.randint(1, 12)))
            out.append(Case(f"runtime: unknown field {extra}", surface, _dumps({**base, f"zz{extra}": 1})))
        elif kind < 0.92:
            raw = _dumps(base)
            out.append(Case("runtime: truncated JSON", surface, raw[:rng.randrange(len(raw))]))
        else:
            depth = rng.randint(200, 3000)
            out.append(Case(f"runtime: nested depth {depth}", surface, _deep(depth)))
    return out


# -- talking to a server -------------------------------------------------------------------------------


@dataclass
class Reply:
    """What one request got: ``status`` None when no answer came (``error`` says why)."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    error: str | None = None
    connection_reusable: bool | None = None  # None: not checked

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> Reply:
    """One request on ``conn`` (kept open); a transport error becomes ``Reply(None, error=...)``."""
    started = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return Reply(None, seconds=time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.perf_counter() - started)


def send_case(conn: http.client.HTTPConnection, case: Case, endpoint: str = "", *, ping: str = "/ping") -> Reply:
    """Send ``case`` on ``conn``, then ``GET ping`` on the same socket to see whether it is still usable."""
    if conn.sock is None:
        conn.connect()
    sock = conn.sock
    reply = send(conn, "POST", case.path(endpoint), case.body, case.headers())
    if reply.status is None:
        reply.connection_reusable = False
        return reply
    if conn.sock is not sock or conn.sock is None:  # the server asked to close (Connection: close)
        reply.connection_reusable = False
        return reply
    conn.auto_open = 0  # a dropped socket must show as an error, not be silently reopened
    try:
        after = send(conn, "GET", ping)
    finally:
        conn.auto_open = 1
    reply.connection_reusable = after.status == 200 and conn.sock is sock
    return reply


def error_shape_problems(case: Case, reply: Reply, *, default_handler: bool = True) -> list[str]:
    """Why ``reply`` is not a clean 4xx in AWS's error shape for ``case``'s surface (empty when it is).

    runtime: 4xx (not 424 for a default-handler endpoint: validation belongs to the daemon),
    ``x-amzn-ErrorType`` header, JSON ``{"message": str}`` without a numeric ``code`` (botocore would read it).
    control: 4xx, JSON ``{"__type": str, "message": str}`` (JSON 1.1; botocore reads ``__type``).
    worker: 4xx, the container's (MMS) JSON ``{"code": status, "type": str, "message": str}``.
    All: an error body of at most ``MAX_ERROR_BODY_BYTES`` and a connection that stays usable.
    """
    if reply.status is None:
        return [f"no answer ({reply.error})"]
    problems: list[str] = []
    if not 400 <= reply.status < 500:
        problems.append(f"HTTP {reply.status}")
    if case.surface == "runtime" and default_handler and reply.status == 424:
        problems.append("424 ModelError: reached the worker (the daemon should have refused it)")
    data = reply.json()
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        problems.append("body is not JSON with a string 'message'")
    elif case.surface == "runtime":
        if not reply.headers.get("x-amzn-errortype"):
            problems.append("no x-amzn-ErrorType header")
        if isinstance(data.get("code"), int):
            problems.append("numeric 'code' key (botocore would take it as the error code)")
    elif case.surface == "control":
        if not isinstance(data.get("__type"), str) and not reply.headers.get("x-amzn-errortype"):
            problems.append("no __type in the body nor x-amzn-ErrorType header")
    elif case.surface == "worker" and (data.get("code") != reply.status or not isinstance(data.get("type"), str)):
        problems.append("not the container's error shape {code, type, message}")
    if reply.status is not None and reply.status >= 400 and len(reply.body) > MAX_ERROR_BODY_BYTES:
        problems.append(f"error body of {len(reply.body)} bytes (echoes the input)")
    if reply.connection_reusable is False:
        problems.append("keep-alive connection not usable afterwards")
    return problems


def describe(reply: Reply) -> str:
    """One line for a report: status, error type and the start of the body."""
    if reply.status is None:
        return f"no answer: {reply.error}"
    kind = reply.headers.get("x-amzn-errortype") or ""
    text = reply.body[:160].decode("utf-8", "replace").replace("\n", " ")
    return f"{reply.status} {kind} {text}".strip()


# -- the daemon, black box -----------------------------------------------------------------------------


class Daemon(BenchDaemon):
    """The shared bench daemon plus the CLI and HTTP calls the reliability phases make."""

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sdmaker", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def create_endpoint(self, name: str, *, workers: int = 1, timeout_s: float | None = None) -> None:
        args = ["endpoint", "create", name, "--model", "mini", "--workers", str(workers)]
        if timeout_s is not None:
            args += ["--timeout", str(timeout_s)]
        done = self.cli(*args)
        if done.returncode != 0 or "InService" not in done.stdout:
            raise RuntimeError(f"endpoint create {name} failed: {done.stdout[-500:]} {done.stderr[-1500:]}")

    def delete_endpoint(self, name: str) -> None:
        self.cli("endpoint", "delete", name, timeout=120)

    def details(self, name: str) -> dict[str, Any]:
        import httpx

        return dict(httpx.get(f"{self.url}/sdmaker/v1/endpoints/{name}", timeout=10).json())

    def wait_ready(self, endpoint: str, timeout_s: float = 300.0) -> None:
        """Until every worker of ``endpoint`` is Ready (after a restart, a phase starts from a healthy endpoint)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            workers = self.details(endpoint).get("workers", [])
            if workers and all(w.get("state") == "Ready" for w in workers):
                return
            time.sleep(0.2)

    def invoke(self, endpoint: str, payload: dict[str, Any], *, timeout: float) -> Reply:
        import httpx

        started = time.perf_counter()
        try:
            r = httpx.post(f"{self.url}/endpoints/{endpoint}/invocations", content=json.dumps(payload), timeout=timeout,
                           headers={"Content-Type": "application/json", "Accept": "application/json"})
        except httpx.HTTPError as exc:
            return Reply(None, seconds=time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
        return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content,
                     time.perf_counter() - started)



def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def _p(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _parallel(n: int, fn: Any) -> list[Any]:
    """``fn(i)`` for i in 0..n-1, each on its own thread, started together; results in order."""
    out: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def go(i: int) -> None:
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# -- the measurements ----------------------------------------------------------------------------------


def _malformed(d: Daemon, endpoint: str, quick: bool) -> list[dict[str, Any]]:
    cases = seen_cases(big=True) + generated_cases(150 if quick else 900)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    replies: list[tuple[Case, Reply]] = []
    for case in cases:
        replies.append((case, send_case(conn, case, endpoint)))
    conn.close()
    five = [(c, r) for c, r in replies if r.status is not None and r.status >= 500]
    none = [(c, r) for c, r in replies if r.status is None]
    m424 = [(c, r) for c, r in replies if r.status == 424]
    ok2 = [(c, r) for c, r in replies if r.status is not None and r.status < 400]
    dropped = [(c, r) for c, r in replies if r.connection_reusable is False]
    times = [r.seconds * 1000 for _, r in replies]
    p99 = _p(times, 0.99)
    shape = [(c, r) for c, r in replies if error_shape_problems(c, r)]
    worst = sorted(replies, key=lambda cr: -cr[1].seconds)[:3]
    examples = "; ".join(f"{c.label} -> {describe(r)[:60]}" for c, r in (five + none)[:4])
    return [
        row(f"reliability: malformed requests, 5xx of {len(cases)}", float(len(five) + len(none)), 0.0, "count",
            f"target 0 x 5xx; {len(five)} x 5xx, {len(none)} unanswered, {len(m424)} x 424 (reached the worker), "
            f"{len(ok2)} accepted (2xx), {len(shape)} not a clean AWS-shaped 4xx in all; {_load_note()}; {examples}",
            lower_is_better=True),
        row("reliability: malformed requests, p99 rejection time", p99, TARGET_P99_MS, "ms",
            f"target <= {TARGET_P99_MS:g} ms (ratio >= 1 meets it); median {statistics.median(times):.1f} ms; slowest: "
            + "; ".join(f"{c.label} {r.seconds * 1000:.0f} ms" for c, r in worst)),
        row("reliability: malformed requests, keep-alive connection unusable after", float(len(dropped)), 0.0, "count",
            f"target 0; of {len(cases)}; e.g. " + "; ".join(c.label for c, _ in dropped[:4]), lower_is_better=True),
    ]


def _calibrate(d: Daemon, endpoint: str) -> tuple[dict[str, Any], float | None]:
    """A request sized so one costs about timeout/8 alone (from measured 64x64 ones), and the 64x64 latency.

    The latency is None when no 64x64 request was answered (a saturated machine): the flood then uses 64x64.
    """
    d.invoke(endpoint, SMALL_REQUEST, timeout=120)  # warm
    answered = [r.seconds for r in (d.invoke(endpoint, SMALL_REQUEST, timeout=120) for _ in range(3)) if r.status == 200]
    if not answered:
        return dict(SMALL_REQUEST), None
    small = statistics.median(answered)
    scale = max(1.0, ENDPOINT_TIMEOUT_S / 8 / small)
    side = int(min(1024, 64 * math.sqrt(scale)) // 8 * 8)
    return {**SMALL_REQUEST, "height": side, "width": side}, small


def _flood(d: Daemon, endpoint: str, payload: dict[str, Any], clients: int = 64) -> list[dict[str, Any]]:
    def one(i: int) -> Reply:
        return d.invoke(endpoint, {**payload, "seed": 100 + i}, timeout=ENDPOINT_TIMEOUT_S * 3)

    started = time.perf_counter()
    replies = _parallel(clients, one)
    wall = time.perf_counter() - started
    served = sum(r.status == 200 for r in replies)
    shed = sum(r.status == 503 and "retry-after" in r.headers for r in replies)
    shed_bare = sum(r.status == 503 and "retry-after" not in r.headers for r in replies)
    lost = [r for r in replies if r.status is None or r.status == 424 or (r.status >= 500 and r.status != 503)]
    late = sum(r.seconds > ENDPOINT_TIMEOUT_S for r in replies)
    other = clients - served - shed - shed_bare - len(lost)
    max_lat = max(r.seconds for r in replies)
    side = payload["height"]
    kinds = statistics_of(lost)
    note = (f"{clients} clients x 1 request ({side}x{side}, {payload['num_inference_steps']} steps, sized so the flood "
            f"is ~8x what the endpoint finishes alone in its {ENDPOINT_TIMEOUT_S:g} s timeout), default queue/batch; "
            f"served {served}, 503+Retry-After {shed}, 503 without it {shed_bare}, lost {len(lost)} ({kinds}), "
            f"other {other}; {late} answers after the {ENDPOINT_TIMEOUT_S:g} s timeout; flood wall {wall:.0f} s. "
            f"Targets: 503s with Retry-After, 0 answers over the timeout, 0 accepted requests lost; {_load_note()}")
    return [
        row(f"reliability: flood of {clients}, requests lost", float(len(lost)), 0.0, "count", note, lower_is_better=True),
        row(f"reliability: flood of {clients}, served", float(served), None, "count", "", lower_is_better=False),
        row(f"reliability: flood of {clients}, 503 with Retry-After", float(shed), None, "count", "",
            lower_is_better=False),
        row(f"reliability: flood of {clients}, max latency", max_lat, ENDPOINT_TIMEOUT_S, "s",
            f"target <= the {ENDPOINT_TIMEOUT_S:g} s timeout (ratio >= 1 meets it)"),
    ]


def statistics_of(replies: list[Reply]) -> str:
    """``"424 x 30, none x 2"``: how a list of replies failed."""
    counts: dict[str, int] = {}
    for r in replies:
        key = "no answer" if r.status is None else str(r.status)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x {v}" for k, v in sorted(counts.items())) or "none"


def _huge_beside_small(d: Daemon, endpoint: str, normal_s: float | None, quick: bool) -> list[dict[str, Any]]:
    side, steps = (1024, 50) if quick else (1536, 500)
    huge = {**SMALL_REQUEST, "height": side, "width": side, "num_inference_steps": steps}
    box: dict[str, Reply] = {}
    t = threading.Thread(target=lambda: box.setdefault("huge", d.invoke(endpoint, huge, timeout=ENDPOINT_TIMEOUT_S * 2)))
    t.start()
    time.sleep(2.0)  # the huge one is running
    if normal_s is None:  # measure it here: the calibration's small requests all failed
        alone = d.invoke(endpoint, SMALL_REQUEST, timeout=ENDPOINT_TIMEOUT_S + 5)
        normal_s = alone.seconds if alone.status == 200 else ENDPOINT_TIMEOUT_S
    patience = min(ENDPOINT_TIMEOUT_S, max(15.0, 10 * normal_s))
    smalls: list[Reply] = []
    for i in range(3):
        smalls.append(d.invoke(endpoint, {**SMALL_REQUEST, "seed": 7 + i}, timeout=patience))
    answered = [r for r in smalls if r.status == 200]
    worst = max(r.seconds for r in smalls) if answered and len(answered) == len(smalls) else None
    note = (f"one {side}x{side} x {steps}-step request running; 3 small ({SMALL_REQUEST['height']}x"
            f"{SMALL_REQUEST['width']}) requests sent one after another, each given {patience:.0f} s: "
            f"{len(answered)}/3 answered ({statistics_of([r for r in smalls if r.status != 200])} failed); small alone "
            f"{normal_s:.2f} s. Target: the small ones in their normal time (ratio ~1); {_load_note()}")
    d.delete_endpoint(endpoint)  # frees the worker the huge request holds
    t.join(timeout=120)
    return [row("reliability: small request latency beside a huge one", worst if worst is not None else patience,
                normal_s, "s", note + ("" if worst is not None else f"; ours = the {patience:.0f} s given up after"))]


#: The endpoint memory share of the budget phase: small, so that the largest accepted request is a size a
#: 2-core CPU generates in seconds, and large enough to hold the worker's runtime (torch, the model).
BUDGET_MEMORY_MB = 1024


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (``VmHWM``), MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _memory_budget(tmp: Path) -> list[dict[str, Any]]:
    """Peak worker memory over the largest requests the endpoint accepts, against the memory it was given.

    A daemon with ``SDMAKER_MEMORY_MB`` set derives the endpoint's pixel budget from it; the phase sends a
    request as close to the budget as up to 8 images of at most 512x512 come, checks that one over it is
    refused with 400, and reads the worker's peak RSS from ``/proc``.
    """
    d = Daemon(tmp / "home-budget", env={"SDMAKER_MEMORY_MB": str(BUDGET_MEMORY_MB), "SDMAKER_STANDBY_WORKERS": "0"})
    try:
        d.create_endpoint("rel-budget", timeout_s=600)
        info = d.details("rel-budget")
        budget = int(info["memory_budget_pixels"])
        pid = int(info["workers"][0]["pid"])
        # the budget's pixels as up to 8 images of at most 512x512 (larger sides take minutes per step on a CPU)
        side = min(512, int(math.sqrt(budget)) // 8 * 8)
        images = max(1, min(8, budget // (side * side)))
        payload = {**SMALL_REQUEST, "height": side, "width": side, "num_inference_steps": 1,
                   "num_images_per_prompt": images}
        reply = d.invoke("rel-budget", payload, timeout=900)
        served = [f"{side}x{side} x {images} images ({side * side * images} px, 1 step): {reply.status}"]
        over = d.invoke("rel-budget", {**SMALL_REQUEST, "height": 2048, "width": 2048, "num_images_per_prompt": 8},
                        timeout=60)
        peak = _peak_rss_mb(pid)
        note = (f"SDMAKER_MEMORY_MB={BUDGET_MEMORY_MB} gives a budget of {budget} px; {'; '.join(served)}; a request "
                f"over the budget got {over.status}; worker peak RSS {peak if peak is None else round(peak)} MiB "
                f"(VmHWM, model and runtime included). Target: peak <= the memory given (ratio >= 1); {_load_note()}")
    finally:
        d.stop()
    return [row("reliability: peak worker memory at the largest accepted requests", peak, float(BUDGET_MEMORY_MB),
                "MiB", note, lower_is_better=True)]


def _busy_worker(d: Daemon, endpoint: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in d.details(endpoint).get("workers", []):
            if w.get("state") == "Busy" and w.get("pid"):
                return dict(w)
        time.sleep(0.02)
    return None


def _kills(d: Daemon, endpoint: str, kills: int, clients: int = 4) -> list[dict[str, Any]]:
    stop = threading.Event()
    replies: list[Reply] = []
    lock = threading.Lock()

    def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            r = d.invoke(endpoint, {**SMALL_REQUEST, "seed": 1000 * i + n}, timeout=300)
            n += 1
            with lock:
                replies.append(r)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    recoveries: list[float] = []
    done = 0
    try:
        for _ in range(kills):
            w = _busy_worker(d, endpoint)
            if w is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(w["pid"]), signal.SIGKILL)
            killed = time.perf_counter()
            done += 1
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # until the slot has a new, ready process
                now = {x.get("id", i): x for i, x in enumerate(d.details(endpoint).get("workers", []))}
                if all(x.get("state") in ("Ready", "Busy") and x.get("pid") != w["pid"] for x in now.values()):
                    break
                time.sleep(0.05)
            recoveries.append(time.perf_counter() - killed)
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=400)
    lost = [r for r in replies if r.status != 200]
    note = (f"{done} x kill -9 of a busy worker of a 2-worker mini endpoint (timeout 120 s) under {clients} clients "
            f"sending 64x64 requests back to back: {len(lost)} of {len(replies)} requests failed "
            f"({statistics_of(lost)}); recovery median {statistics.median(recoveries) if recoveries else 0:.1f} s, "
            f"max {max(recoveries) if recoveries else 0:.1f} s. Target 0 lost; {_load_note()}")
    return [row(f"reliability: worker kills ({done} x kill -9), requests lost", float(len(lost)), 0.0, "count", note,
                lower_is_better=True)]


def _sigterm(d: Daemon, endpoint: str, payload: dict[str, Any], inflight: int) -> list[dict[str, Any]]:
    results: list[Reply | None] = [None] * inflight

    def one(i: int) -> None:
        results[i] = d.invoke(endpoint, {**payload, "seed": 500 + i}, timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(inflight)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until the daemon holds them all (queued or running)
        info = d.details(endpoint)
        busy = sum(w.get("state") == "Busy" for w in info.get("workers", []))
        if (info.get("queue_depth") or 0) + busy >= min(inflight, 2):
            break
        time.sleep(0.05)
    time.sleep(1.0)
    pid_file = d.home / "daemon.pid"
    had_pid_file = pid_file.exists()
    d.proc.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    time.sleep(0.5)
    during = d.invoke(endpoint, SMALL_REQUEST, timeout=30)
    try:
        d.proc.wait(timeout=120)
        drain = time.perf_counter() - sent
    except subprocess.TimeoutExpired:
        drain = time.perf_counter() - sent
        d.proc.kill()
        d.proc.wait()
    for t in threads:
        t.join(timeout=60)
    replies = [r if r is not None else Reply(None, error="thread did not finish") for r in results]
    served = sum(r.status == 200 for r in replies)
    clean = sum(r.status is not None and r.status != 200 and bool(r.headers.get("x-amzn-errortype"))
                and isinstance(r.json(), dict) for r in replies)
    bare = [r for r in replies if r.status != 200 and not (r.status is not None and r.headers.get("x-amzn-errortype"))]
    pid_left = pid_file.exists()
    during_text = describe(during)[:80]
    note = (f"SIGTERM with {inflight} requests ({payload['height']}x{payload['width']}) in flight: {served} answered, "
            f"{clean} clean AWS-shaped errors, {len(bare)} bare 500 / dropped ({statistics_of(bare)}); a request sent "
            f"0.5 s after SIGTERM got: {during_text}; pid file {'left behind' if pid_left else 'removed'}"
            f"{'' if had_pid_file else ' (none was written)'}. Target drain <= {TARGET_DRAIN_S:g} s, 0 bare 500s, "
            f"new requests 503, pid file removed; {_load_note()}")
    return [
        row("reliability: SIGTERM drain time", drain, TARGET_DRAIN_S, "s", note + " (ratio >= 1 meets the target)"),
        row("reliability: SIGTERM, in-flight requests without a clean answer", float(len(bare)), 0.0, "count", "",
            lower_is_better=True),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sdmaker-bench-reliability-"))
    d: Daemon | None = None
    try:
        d = Daemon(tmp / "home")
        d.wait_standby()
        d.create_endpoint("rel-mini")
        payload, small_s = _calibrate(d, "rel-mini")
        rows += _malformed(d, "rel-mini", quick)
        d.wait_ready("rel-mini")
        rows += _flood(d, "rel-mini", payload)
        d.delete_endpoint("rel-mini")
        d.wait_standby()
        d.create_endpoint("rel-huge")
        d.invoke("rel-huge", SMALL_REQUEST, timeout=120)  # warm
        rows += _huge_beside_small(d, "rel-huge", small_s, quick)
        d.wait_standby()
        d.create_endpoint("rel-kill", workers=2, timeout_s=120)
        rows += _kills(d, "rel-kill", 3 if quick else 10)
        d.wait_ready("rel-kill")
        rows += _sigterm(d, "rel-kill", payload, 8 if quick else 12)
        rows += _memory_budget(tmp)
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
