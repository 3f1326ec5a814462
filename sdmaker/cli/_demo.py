"""``sdmaker demo``: the whole workflow end to end on the embedded default model (what ``make demo`` runs).

1. resolve the built-in ``mini`` model (falls back to a random-weight model, saying its images are noise);
2. generate a contact sheet of several prompts, captions printed under each image;
3. package the model with the seed's ``code/inference.py`` as a SageMaker ``model.tar.gz``;
4. import that archive back into the store (same digest = nothing lost);
5. start the platform daemon on a free loopback port, deploy the archive through the ``sagemaker`` API with
   boto3, invoke it through ``sagemaker-runtime`` with the seed's JSON, decode the images, delete the endpoint;
6. print where every file is.

It must work on a busy 2-core machine and twice in a row: the endpoint request is small, under a generous
timeout (:data:`DEMO_TIMEOUT_S`, printed), the daemon's state in ``OUT/daemon-home`` is the demo's own and
wiped at each run, and a failure prints the summary table (with the failed step) and the endpoint's and
daemon's logs themselves, since the daemon is gone once the demo exits.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from sdmaker.cli._common import console, get_settings, print_error, setup_logging
from sdmaker.config import Settings
from sdmaker.errors import SdmakerError
from sdmaker.files import MODEL_CARD_FILE

__all__ = ["register"]

PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue star in the top left corner, black background",
    "white background, large green triangle at the bottom",
    "a yellow square on a purple background",
    "an orange circle to the left of a blue square, white background",
    "a purple star above a yellow circle on a black background",
    "a large white square on the right, green background",
    "black background, a small orange triangle in the bottom right corner",
]
_EXAMPLE_CODE = Path(__file__).resolve().parents[2] / "examples" / "seed" / "code"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _step(title: str) -> float:
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def _default_model(settings: Settings, out: Path) -> tuple[Any, bool]:
    """The built-in ``mini`` model, or a random-weight stand-in when its weights are missing."""
    from sdmaker.cli._common import load_model_ref
    from sdmaker.errors import ModelNotFoundError

    try:
        return load_model_ref("mini", settings), True
    except ModelNotFoundError as exc:
        from sdmaker.engine import build_random_pipeline

        console.print(f"[yellow]The built-in model is not available ({exc.message}).[/yellow]\n"
                      "[yellow]Using a tiny RANDOM-WEIGHT model instead: its images are noise.[/yellow]")
        folder = out / "random-model"
        if not (folder / "model_index.json").exists():
            build_random_pipeline("minilm-tiny", folder)
            # The stand-in is as small as the built-in: 64x64 images, few steps.
            (folder / MODEL_CARD_FILE).write_text(json.dumps(
                {"name": "random-minilm-tiny", "defaults": {"height": 64, "width": 64, "num_inference_steps": 10}}))
        return load_model_ref(str(folder), settings), False


def _contact_sheet(model: Any, out: Path, steps: int | None) -> Path:
    from sdmaker.engine import contact_sheet, generate
    from sdmaker.schema import GenerateRequest

    images, captions = [], []
    for i, prompt in enumerate(PROMPTS):
        result = generate(model, GenerateRequest(prompt=prompt, seed=1000 + i, num_inference_steps=steps,
                                                 format="png"))
        images.append(result.images[0].image)
        captions.append(prompt)
        (out / "images").mkdir(exist_ok=True)
        (out / "images" / f"{i:02d}.png").write_bytes(result.encode(0))
    sheet = out / "contact-sheet.png"
    contact_sheet(images, captions, columns=4, cell=160).save(sheet)
    return sheet


#: The demo endpoint's invocation timeout. The request is 2 prompts x 64x64 x a few steps: about a second on an
#: idle laptop, a few minutes at worst on 2 cores shared with many busy processes (the seed's 50-step
#: fp32 request once timed out at step 33 under the default 60 s on such a machine).
DEMO_TIMEOUT_S = 600
#: Steps of the endpoint request when neither --steps nor the model's defaults say (the seed's handler
#: itself would run 50).
DEMO_ENDPOINT_STEPS = 10
_LOG_TAIL_LINES = 60
_DEMO_NAME = "mini-demo"


class DemoFailed(Exception):
    """A demo step failed; its message says which and why (the logs were already printed)."""


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _print_log(title: str, text: str) -> None:
    console.rule(f"[red]{title}")
    console.print(Text(_tail(text) or "(empty)"), soft_wrap=True, highlight=False)


def _endpoint_log(url: str, settings: Settings) -> str:
    """The endpoint's worker log, fetched while the demo's daemon still runs (it stops with the demo)."""
    from sdmaker.client import Client

    try:
        with Client(url, settings=settings, timeout=10.0) as client:
            return client.logs(_DEMO_NAME, offset=0)[0]
    except Exception as exc:  # the log is a diagnostic: never hide the original failure behind its own
        return f"(could not read the endpoint log: {exc})"


def _deploy_and_invoke(settings: Settings, archive: Path, out: Path, steps: int) -> list[Path]:
    """Steps 8-9 of the seed through boto3, against a daemon started here on a free loopback port.

    The daemon keeps its state in ``out/daemon-home``, which belongs to the demo alone: it is wiped first,
    so a rerun (even after a failed or interrupted one) starts clean instead of meeting last run's model.
    """
    import boto3
    from botocore.config import Config
    from PIL import Image

    port = _free_port()
    home = out / "daemon-home"
    shutil.rmtree(home, ignore_errors=True)
    env = {**settings.env, "SDMAKER_HOME": str(home), "AWS_ACCESS_KEY_ID": "sdmaker", "AWS_SECRET_ACCESS_KEY":
           "sdmaker", "AWS_DEFAULT_REGION": "us-east-1",
           # the demo's private daemon trusts exactly the credentials the demo signs with, even when the
           # user's environment turns the local key on (SDMAKER_LOCAL_KEY=1)
           "SDMAKER_ACCESS_KEY_ID": "sdmaker", "SDMAKER_SECRET_ACCESS_KEY": "sdmaker"}
    log_path = out / "daemon.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "up", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    # botocore's own read timeout (60 s) and retries would cut the invocation short or send it twice
    boto = Config(read_timeout=DEMO_TIMEOUT_S + 30, connect_timeout=10, retries={"max_attempts": 1})
    keys = {"region_name": "us-east-1", "aws_access_key_id": "sdmaker", "aws_secret_access_key": "sdmaker"}
    failed = False
    endpoint_created = False
    try:
        sm = boto3.client("sagemaker", endpoint_url=url, config=boto, **keys)
        rt = boto3.client("sagemaker-runtime", endpoint_url=url, config=boto, **keys)
        deadline = time.monotonic() + 300
        while True:
            try:
                sm.list_endpoints()
                break
            except Exception:
                if proc.poll() is not None:
                    raise DemoFailed(f"the daemon exited during startup (exit code {proc.returncode})") from None
                if time.monotonic() > deadline:
                    raise DemoFailed(f"the daemon did not answer {url} within 300 s") from None
                time.sleep(0.3)
        started = time.perf_counter()
        sm.create_model(ModelName=_DEMO_NAME, ExecutionRoleArn="arn:aws:iam::111122223333:role/demo",
                        PrimaryContainer={"Image": "huggingface-pytorch-inference", "ModelDataUrl": str(archive),
                                          "Environment": {
                                              "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": str(DEMO_TIMEOUT_S)}})
        sm.create_endpoint_config(EndpointConfigName=_DEMO_NAME, ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": _DEMO_NAME, "InitialInstanceCount": 1,
            "InstanceType": "ml.m5.xlarge"}])
        sm.create_endpoint(EndpointName=_DEMO_NAME, EndpointConfigName=_DEMO_NAME)
        endpoint_created = True
        sm.get_waiter("endpoint_in_service").wait(EndpointName=_DEMO_NAME,
                                                  WaiterConfig={"Delay": 1, "MaxAttempts": 900})
        console.print(f"endpoint InService in {time.perf_counter() - started:.1f} s")
        data: dict[str, Any] = {"prompt": PROMPTS[:2], "height": 64, "width": 64, "num_images_per_prompt": 1,
                                "num_inference_steps": steps}
        console.print(f"invoking with {steps} steps at 64x64 under a {DEMO_TIMEOUT_S} s invocation timeout "
                      f"(room for a busy 2-core machine; the seed's handler alone would run 50 steps)",
                      highlight=False, soft_wrap=True)
        resp = rt.invoke_endpoint(EndpointName=_DEMO_NAME, ContentType="application/json",
                                  Accept="application/json", Body=json.dumps(data))
        payload = json.loads(resp["Body"].read())
        paths = []
        for i, b64 in enumerate(payload["generated_images"]):
            path = out / f"endpoint-{i}.jpg"
            Image.open(io.BytesIO(base64.b64decode(b64))).save(path)
            paths.append(path)
        sm.delete_endpoint(EndpointName=_DEMO_NAME)
        endpoint_created = False
        return paths
    except Exception:
        failed = True
        if endpoint_created and proc.poll() is None:
            _print_log(f"endpoint {_DEMO_NAME} log (last {_LOG_TAIL_LINES} lines)", _endpoint_log(url, settings))
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if failed:
            _print_log(f"daemon log {log_path} (last {_LOG_TAIL_LINES} lines)",
                       log_path.read_text(errors="replace"))


class _Steps:
    """The demo's steps and their summary rows; a failed step gets a FAILED row, and the table is printed
    whether the demo succeeded or not (it is the record of what was done)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str | Text, str]] = []

    @contextlib.contextmanager
    def step(self, title: str, what: str) -> Iterator[None]:
        t = _step(title)
        try:
            yield
        except BaseException as exc:
            message = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
            self.rows.append((f"[red]{what}: FAILED[/red]", Text(message), f"{time.perf_counter() - t:.1f} s"))
            raise

    def table(self, title: str) -> Table:
        table = Table(title=title)
        for col in ("what", "where", "time"):
            table.add_column(col, overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        return table


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its files.")] = Path("demo-output"),
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    deploy: Annotated[bool, typer.Option(help="Also deploy an endpoint and invoke it with boto3.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the whole workflow on the built-in model and print where every file went (rerunnable)."""
    from sdmaker.store import package_model, resolve_model

    setup_logging(verbose)
    settings = get_settings()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = _Steps()
    real = True
    try:
        with run.step("1. model", "model"):
            t = time.perf_counter()
            model, real = _default_model(settings, out)
            run.rows.append(("model", f"{model.name} ({model.digest[:12]})", f"{time.perf_counter() - t:.1f} s"))

        with run.step("2. generate a contact sheet", "contact sheet"):
            t = time.perf_counter()
            sheet = _contact_sheet(model, out, steps)
            run.rows.append(("contact sheet" + ("" if real else " (NOISE: random weights)"), str(sheet),
                             f"{time.perf_counter() - t:.1f} s"))

        with run.step("3. package model.tar.gz with code/inference.py", "model.tar.gz"):
            result = package_model(model.path, out / "model.tar.gz", code_dir=_EXAMPLE_CODE)
            run.rows.append(("model.tar.gz", result.path,
                             f"{result.seconds:.1f} s, {result.bytes_out / 2**20:.1f} MiB"))

        with run.step("4. import the archive back into the store", "store import"):
            t = time.perf_counter()
            back = resolve_model(str(out / "model.tar.gz"), settings)
            run.rows.append(("store import", f"{back.name} -> {back.path}", f"{time.perf_counter() - t:.1f} s"))
            console.print(f"imported as [bold]{back.name}[/bold], digest {back.digest[:12]}")

        if deploy:
            with run.step("5. deploy an endpoint and invoke it (boto3 sagemaker + sagemaker-runtime)",
                          "deploy + invoke"):
                t = time.perf_counter()
                endpoint_steps = steps or int(model.defaults.get("num_inference_steps") or DEMO_ENDPOINT_STEPS)
                for path in _deploy_and_invoke(settings, out / "model.tar.gz", out, endpoint_steps):
                    run.rows.append(("endpoint image", str(path), ""))
                run.rows.append(("deploy + invoke", str(out / "daemon.log"), f"{time.perf_counter() - t:.1f} s"))
    except Exception as exc:
        console.print(run.table("sdmaker demo: FAILED (what was done, and the step that failed)"))
        message = exc.message if isinstance(exc, SdmakerError) else f"{type(exc).__name__}: {exc}"
        print_error(f"the demo failed: {message} (its files are in {out}; rerun `sdmaker demo` when fixed)")
        raise typer.Exit(1) from exc

    console.print(run.table("sdmaker demo: where everything went"))
    if not real:
        console.print("[yellow]Images are noise: the built-in model's weights were not found.[/yellow]")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
