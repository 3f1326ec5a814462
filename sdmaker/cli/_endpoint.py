"""``sdmaker up | down | env | endpoint ... | invoke``: the daemon and its endpoints from the shell."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sdmaker.cli._common import console, get_settings, setup_logging, write_new_file
from sdmaker.cli._progress import image_bars
from sdmaker.cli._request_options import request_from_options, request_options
from sdmaker.config import S3_PATH_PREFIX, Settings, check_engine
from sdmaker.errors import ConfigError, ServingError
from sdmaker.files import atomic_write_text, pid_alive

__all__ = ["register"]

endpoint_app = typer.Typer(help="Create, inspect, update and delete endpoints on the running daemon.",
                           no_args_is_help=True)

_SDK_CONFIG = """SchemaVersion: '1.0'
SageMaker:
  PythonSDK:
    Modules:
      Session:
        DefaultS3Bucket: {bucket}
      TelemetryOptOut: true
"""


def _pid_file(settings: Settings) -> Path:
    return settings.home / "daemon.pid"


def _running_pid(settings: Settings) -> int | None:
    """The daemon's pid if its pid file names a live process."""
    try:
        pid = int(json.loads(_pid_file(settings).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if pid_alive(pid) else None


def _client(settings: Settings, url: str | None = None) -> Any:
    from sdmaker.client import Client

    return Client(url, settings=settings)


# -- daemon ------------------------------------------------------------------------------------------


def up_cmd(
    port: Annotated[int | None, typer.Option(help="Port (default SDMAKER_PORT or 8765).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address; anything but loopback requires credentials.")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background (pid file in SDMAKER_HOME).")]
    = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help=(
        "Run endpoint replicas on this Ray cluster (host:port of its head, or 'auto'; default SDMAKER_RAY_ADDRESS)."
    ))] = None,
) -> None:
    """Start the platform daemon: SageMaker control plane + runtime API on one port."""
    from sdmaker.serving import check_bind

    settings = get_settings()
    host = host or settings.daemon_host
    port = port or settings.daemon_port
    check_bind(settings, host)  # refuse before binding anything
    ray = ray or settings.ray_address
    if ray:
        from sdmaker.serving.daemon.ray import check_ray_address, load_instance_table

        ray = check_ray_address(ray)  # an unreachable cluster is a one-line error, before anything starts
        load_instance_table(settings.ray_instance_types)
    if (pid := _running_pid(settings)) is not None:
        raise ConfigError(f"a daemon is already running (pid {pid}); stop it with `sdmaker down`", field="pid")
    settings.home.mkdir(parents=True, exist_ok=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if detach:
        if _port_in_use(host, port):  # another daemon (another SDMAKER_HOME) or program: say so, start nothing
            raise ServingError(f"port {port} on {host} is already in use (another sdmaker daemon, perhaps with "
                               "another SDMAKER_HOME, or another program): stop it, or pick a free port with "
                               "--port / SDMAKER_PORT", field="port")
        log = settings.home / "daemon.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "up", "--host", host, "--port", str(port),
                                     *(["--ray", ray] if ray else [])],
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        _wait_up(url, proc, log, port)
        console.print(f"sdmaker daemon running at {url} (pid {proc.pid}, log {log})", highlight=False)
        return
    from sdmaker.serving import run_daemon

    setup_logging(verbose)
    if not verbose:
        import logging

        logging.getLogger("sdmaker").setLevel(logging.INFO)
    atomic_write_text(_pid_file(settings), json.dumps({"pid": os.getpid(), "url": url}))
    if ray:
        from dataclasses import replace

        settings = replace(settings, ray_address=ray, daemon_host=host, daemon_port=port)
    try:
        run_daemon(settings, host=host, port=port)
    finally:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(_pid_file(settings).read_text())["pid"] == os.getpid():
                _pid_file(settings).unlink()


def _port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind with SO_REUSEADDR, as uvicorn does, fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a listening TCP socket on ``port``; None where this cannot be told.

    Linux only (``/proc/net/tcp*`` for the listening sockets' inodes, ``/proc/PID/fd`` for the process's).
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) in {f"socket:[{inode}]" for inode in inodes}:
                return True
    return False


def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path, port: int, timeout_s: float = 60.0) -> None:
    """Wait until the daemon ``proc`` -- this one, not whatever else answers on ``url`` -- serves ``/ping``.

    A 200 from ``/ping`` alone proves nothing: another daemon may own the port while ours fails to bind
    and exits. So success also needs ``proc`` alive and, where the OS tells, holding the listening socket.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    answered_by_other = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            other = f" (another process answers on {url})" if answered_by_other else ""
            raise ServingError(f"the daemon exited during startup{other}: " + " | ".join(tail), log=str(log))
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ping", timeout=1.0).status_code == 200:
                if _listens_on(proc.pid, port) is not False and proc.poll() is None:
                    return
                answered_by_other = True
        time.sleep(0.2)
    proc.terminate()  # never leave a daemon behind that this command reported as failed
    if answered_by_other:
        raise ServingError(f"another process answers on {url}, not the daemon started here (pid {proc.pid}); "
                           f"see {log}", log=str(log))
    raise ServingError(f"the daemon did not answer {url}/ping within {timeout_s:g} s; see {log}", log=str(log))


def down_cmd(timeout: Annotated[float, typer.Option(help="Seconds to wait before SIGKILL.")] = 30.0) -> None:
    """Stop the daemon started by `sdmaker up` (its workers stop with it)."""
    settings = get_settings()
    pid = _running_pid(settings)
    if pid is None:
        _pid_file(settings).unlink(missing_ok=True)
        console.print("no sdmaker daemon is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _running_pid(settings) == pid:
        time.sleep(0.1)
    if _running_pid(settings) == pid:
        os.kill(pid, signal.SIGKILL)
    _pid_file(settings).unlink(missing_ok=True)
    console.print(f"stopped sdmaker daemon (pid {pid})")


def env_cmd(
    bucket: Annotated[str, typer.Option(help="S3 bucket the SageMaker SDK uses as its default bucket.")] = "sdmaker",
    url: Annotated[str | None, typer.Option(help="Daemon URL (default: SDMAKER_URL or 127.0.0.1:SDMAKER_PORT).")]
    = None,
) -> None:
    """Print the exports that point boto3 and the SageMaker SDK at sdmaker: eval "$(sdmaker env)".

    S3 goes to the daemon's built-in S3 (AWS_ENDPOINT_URL_S3=<url>/s3) unless an S3 endpoint of your own is
    configured (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or endpoint_url in ~/.aws/config) or SDMAKER_S3=off.
    """
    settings = get_settings()
    url = (url or settings.client_url).rstrip("/")
    config = settings.home / "sagemaker-config.yaml"
    atomic_write_text(config, _SDK_CONFIG.format(bucket=bucket))
    key = settings.auth_access_key_id
    secret = settings.auth_secret_access_key
    lines = [
        f"export AWS_ENDPOINT_URL_SAGEMAKER={shlex.quote(url)}",
        f"export AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME={shlex.quote(url)}",
        # transform job logs, which the SageMaker SDK tails while it waits (CloudWatch Logs subset)
        f"export AWS_ENDPOINT_URL_CLOUDWATCH_LOGS={shlex.quote(url)}",
        # boto3's name for application-autoscaling (its service id is "Application Auto Scaling")
        f"export AWS_ENDPOINT_URL_APPLICATION_AUTO_SCALING={shlex.quote(url)}",
        # a daemon with credentials needs them; otherwise keep the user's (S3 may need real ones) or dummies
        f"export AWS_ACCESS_KEY_ID={shlex.quote(key)}" if key else 'export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-sdmaker}"',
        f"export AWS_SECRET_ACCESS_KEY={shlex.quote(secret)}" if key and secret else
        'export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-sdmaker}"',
        f'export AWS_DEFAULT_REGION="${{AWS_DEFAULT_REGION:-{settings.region}}}"',
        f'export AWS_REGION="${{AWS_REGION:-{settings.region}}}"',
        f"export SAGEMAKER_USER_CONFIG_OVERRIDE={shlex.quote(str(config))}",
    ]
    if settings.uses_builtin_s3:  # no S3 of the user's own: the daemon's (sdmaker.serving.s3)
        lines.insert(2, f"export AWS_ENDPOINT_URL_S3={shlex.quote(url + S3_PATH_PREFIX)}")
    for line in lines:
        typer.echo(line)


# -- endpoints ---------------------------------------------------------------------------------------


@endpoint_app.command("create")
def create_cmd(
    name: Annotated[str, typer.Argument(help="Endpoint name (letters, digits, hyphens).")],
    model: Annotated[str, typer.Option("--model", "-m", help=(
        "Store name, folder, model.tar.gz or s3:// URI (default: the built-in mini)."))] = "mini",
    workers: Annotated[int, typer.Option(help="Worker processes (SageMaker InitialInstanceCount).")] = 1,
    timeout: Annotated[float | None, typer.Option(help="Invocation timeout in seconds (default 60).")] = None,
    instance_type: Annotated[str, typer.Option(help="ml.* type; GPU types use CUDA when present.")] = "ml.m5.xlarge",
    wait: Annotated[bool, typer.Option(help="Wait until InService.")] = True,
    max_batch: Annotated[int | None, typer.Option(min=0, max=256, help=(
        "Concurrent requests per worker that share UNet steps (SDMAKER_MAX_BATCH; 0 = off; default 8 for "
        "models without code/inference.py, off for those with it)."))] = None,
    async_output: Annotated[str | None, typer.Option(help=(
        "s3://bucket/prefix: make it an asynchronous inference endpoint writing results there "
        "(invoke --async, InvokeEndpointAsync)."))] = None,
    engine: Annotated[str | None, typer.Option(help=(
        "Backend of the workers' compiled UNet passes (SDMAKER_ENGINE: auto, torch or openvino; default auto: "
        "OpenVINO on AVX512-BF16 CPUs, AMX or not; torch's AOTInductor elsewhere)."))] = None,
) -> None:
    """Deploy MODEL as endpoint NAME (CreateModel + CreateEndpointConfig + CreateEndpoint)."""
    env = {} if max_batch is None else {"SDMAKER_MAX_BATCH": str(max_batch)}
    if engine is not None:
        env["SDMAKER_ENGINE"] = check_engine(engine, field="engine")
    with _client(get_settings()) as client:
        info = client.create_endpoint(name, model=model, workers=workers, instance_type=instance_type,
                                      timeout_s=timeout, environment=env or None, wait=wait,
                                      async_output=async_output)
    console.print(f"{name}: {info['status']}", highlight=False)


@endpoint_app.command("list")
def list_cmd() -> None:
    """List endpoints with their status and worker count."""
    with _client(get_settings()) as client:
        rows = client.list_endpoints()
    table = Table("name", "status", "workers", "model", "requests", "errors")
    for r in rows:
        workers = r.get("workers") or []
        ready = sum(1 for w in workers if w["state"] in ("Ready", "Busy"))
        table.add_row(r["name"], r["status"], f"{ready}/{len(workers)}", str(r.get("model_name") or "-"),
                      str(r.get("invocations", 0)), str(r.get("errors", 0)))
    console.print(table)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


@endpoint_app.command("describe")
def describe_cmd(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Status, workers, model digest, request counts and p50/p95 latency."""
    with _client(get_settings()) as client:
        info = client.describe_endpoint(name)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    rows = [("status", info["status"]), ("failure reason", info.get("failure_reason") or "-"),
            ("model", f"{info.get('model_name') or '-'} ({info.get('model_path') or '-'})"),
            ("model digest", info.get("model_digest") or "-"), ("instance type", info.get("instance_type") or "-"),
            ("requests", str(info.get("invocations", 0))), ("errors", str(info.get("errors", 0))),
            ("latency p50 / p95", f"{_ms(info.get('latency_p50_s'))} / {_ms(info.get('latency_p95_s'))}"),
            ("timeout", f"{info.get('timeout_s', '-')} s"), ("queue", f"{info.get('queue_depth', 0)} / "
                                                              f"{info.get('max_queue', '-')}"),
            ("expected wait", f"{info.get('expected_wait_s') or 0:.1f} s"),
            ("step batching", f"up to {info['max_batch']} requests per worker" if info.get("max_batch") else "off"),
            ("async backlog", f"{info.get('ApproximateBacklogSize', 0)} job(s), oldest queued "
                              f"{info.get('ApproximateAgeOfOldestRequest', 0):.1f} s")]
    mme = info.get("multi_model")
    if mme:  # a multi-model endpoint: its prefix, memory and loaded target models (each with its own worker)
        hits = mme["metrics"]["ModelCacheHit"]
        rows.append(("multi-model", f"{mme['prefix']}: {len(mme['models'])} model(s), {mme['memory_used_mib']:.0f} "
                                    f"of {mme['memory_budget_mib']:.0f} MiB, cache hits {hits['hits']} / misses "
                                    f"{hits['misses']}"))
        rows += [(m["target_model"], f"{m['state']}, {m['memory_mib']:.0f} MiB, {m['hits']} hit(s), idle "
                                     f"{m['idle_s']:.0f} s{' ' + m['error'] if m.get('error') else ''}")
                 for m in mme["models"]]
    for key, value in rows:
        console.print(f"[bold]{key:>18}[/bold]  {value}", highlight=False)
    for w in info.get("workers", []):
        if w.get("backend") == "ray":
            console.print(f"{'replica ' + str(w['index']):>18}  {w['state']} on node {str(w.get('node'))[:12]} "
                          f"pid {w['pid']} restarts {w['restarts']} served {w.get('served', 0)} (model from "
                          f"{w.get('model_source') or '-'}){' ' + w['error'] if w.get('error') else ''}",
                          highlight=False)
            continue
        started = "warm standby" if w.get("standby") else "fresh process"
        console.print(f"{'worker ' + str(w['index']):>18}  {w['state']} pid {w['pid']} port {w['port']} "
                      f"restarts {w['restarts']} served {w.get('served', 0)} ({started}, ready {w.get('startup_seconds') or '-'} s after start)",
                      highlight=False)


@endpoint_app.command("update")
def update_cmd(
    name: str,
    model: Annotated[str, typer.Option("--model", "-m", help="Store name, folder, model.tar.gz or s3:// URI.")],
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    timeout: Annotated[float | None, typer.Option(help="Invocation timeout in seconds.")] = None,
) -> None:
    """Blue/green update: new workers load next to the old ones, which drain once the new ones are ready."""
    with _client(get_settings()) as client:
        info = client.update_endpoint(name, model=model, workers=workers, timeout_s=timeout)
    console.print(f"{name}: {info['status']}", highlight=False)


@endpoint_app.command("delete")
def delete_cmd(name: str) -> None:
    """Delete the endpoint (its workers stop), its endpoint config and its model."""
    with _client(get_settings()) as client:
        client.delete_endpoint(name)
    console.print(f"deleted {name}", highlight=False)


@endpoint_app.command("logs")
def logs_cmd(name: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")]
             = False) -> None:
    """Print the endpoint's worker and lifecycle log."""
    with _client(get_settings()) as client:
        offset = 0
        while True:
            text, offset = client.logs(name, offset=offset)
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
            if not follow:
                return
            if not text:
                time.sleep(0.5)


@request_options()
def invoke_cmd(
    request_values: dict[str, Any],
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("sdmaker-out"),
    run_async: Annotated[bool, typer.Option("--async", help=(
        "Queue it (InvokeEndpointAsync) and print the job id and output location; follow it with "
        "`sdmaker jobs show|wait`."))] = False,
) -> None:
    """Generate images on an endpoint and write them to --out as <endpoint>-NN-seedS.ext (never overwriting)."""
    request = request_from_options(request_values)  # validated before anything is sent (or torch imported)
    if run_async:
        with _client(get_settings()) as client:
            answer = client.invoke_async(name, request.model_dump(mode="json", exclude_unset=True))
        console.print(f"job {answer['InferenceId']} queued; result: {answer['OutputLocation']}", highlight=False,
                      soft_wrap=True)
        return
    images = len(request.prompts) * (request.num_images_per_prompt or 1)
    seeds = [request.seed + i for i in range(images)] if request.seed is not None else None
    with _client(get_settings()) as client, image_bars(images, request.num_inference_steps or 1, seeds) as bars:
        # the response stream carries the job's progress lines, then the answer
        gen = client.generate(name, on_progress=bars.on_event, **request.model_dump(exclude_unset=True))
    seeds = gen.raw.get("seeds") if isinstance(gen.raw.get("seeds"), list) else None
    for i, data in enumerate(gen.images):
        stem = f"{name}-{i:02d}" + (f"-seed{seeds[i]}" if seeds and i < len(seeds) else "")
        path = write_new_file(out, stem, gen.extension(i), data)
        console.print(str(path), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)
    app.command("env")(env_cmd)
    app.command("invoke")(invoke_cmd)
    app.add_typer(endpoint_app, name="endpoint")
