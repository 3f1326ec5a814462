"""``sdmaker demo``: the whole workflow end to end on the embedded default model (what ``make demo`` runs).

1. resolve the built-in ``mini`` model (falls back to a random-weight model, saying its images are noise);
2. generate a contact sheet of several prompts, captions printed under each image;
3. package the model with the seed's ``code/inference.py`` as a SageMaker ``model.tar.gz``;
4. import that archive back into the store (same digest = nothing lost);
5. start the platform daemon on a free loopback port, deploy the archive through the ``sagemaker`` API with
   boto3, invoke it through ``sagemaker-runtime`` with the seed's JSON, decode the images, delete the endpoint;
6. print where every file is.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sdmaker.cli._common import console, get_settings, setup_logging
from sdmaker.config import Settings

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
            (folder / "sdmaker.json").write_text(json.dumps(
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


def _deploy_and_invoke(settings: Settings, archive: Path, out: Path, steps: int | None) -> list[Path]:
    """Steps 8-9 of the seed through boto3, against a daemon started here on a free loopback port."""
    import boto3
    from PIL import Image

    port = _free_port()
    home = out / "daemon-home"
    env = {**settings.env, "SDMAKER_HOME": str(home), "AWS_ACCESS_KEY_ID": "sdmaker", "AWS_SECRET_ACCESS_KEY":
           "sdmaker", "AWS_DEFAULT_REGION": "us-east-1"}
    log = (out / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "up", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        sm = boto3.client("sagemaker", endpoint_url=url, region_name="us-east-1", aws_access_key_id="sdmaker",
                          aws_secret_access_key="sdmaker")
        rt = boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="sdmaker", aws_secret_access_key="sdmaker")
        deadline = time.monotonic() + 60
        while True:
            try:
                sm.list_endpoints()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not start; see {out / 'daemon.log'}") from None
                time.sleep(0.3)
        started = time.perf_counter()
        sm.create_model(ModelName="mini-demo", ExecutionRoleArn="arn:aws:iam::111122223333:role/demo",
                        PrimaryContainer={"Image": "huggingface-pytorch-inference", "ModelDataUrl": str(archive)})
        sm.create_endpoint_config(EndpointConfigName="mini-demo", ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": "mini-demo", "InitialInstanceCount": 1,
            "InstanceType": "ml.m5.xlarge"}])
        sm.create_endpoint(EndpointName="mini-demo", EndpointConfigName="mini-demo")
        sm.get_waiter("endpoint_in_service").wait(EndpointName="mini-demo",
                                                  WaiterConfig={"Delay": 1, "MaxAttempts": 300})
        console.print(f"endpoint InService in {time.perf_counter() - started:.1f} s")
        data: dict[str, Any] = {"prompt": PROMPTS[:2], "height": 64, "width": 64, "num_images_per_prompt": 1}
        if steps:
            data["num_inference_steps"] = steps
        resp = rt.invoke_endpoint(EndpointName="mini-demo", ContentType="application/json",
                                  Accept="application/json", Body=json.dumps(data))
        payload = json.loads(resp["Body"].read())
        paths = []
        for i, b64 in enumerate(payload["generated_images"]):
            path = out / f"endpoint-{i}.jpg"
            Image.open(io.BytesIO(base64.b64decode(b64))).save(path)
            paths.append(path)
        sm.delete_endpoint(EndpointName="mini-demo")
        return paths
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its files.")] = Path("demo-output"),
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    deploy: Annotated[bool, typer.Option(help="Also deploy an endpoint and invoke it with boto3.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the whole workflow on the built-in model and print where every file went."""
    from sdmaker.store import package_model, resolve_model

    setup_logging(verbose)
    settings = get_settings()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []

    t = _step("1. model")
    model, real = _default_model(settings, out)
    rows.append(("model", f"{model.name} ({model.digest[:12]})", f"{time.perf_counter() - t:.1f} s"))

    t = _step("2. generate a contact sheet")
    sheet = _contact_sheet(model, out, steps)
    rows.append(("contact sheet" + ("" if real else " (NOISE: random weights)"), str(sheet),
                 f"{time.perf_counter() - t:.1f} s"))

    t = _step("3. package model.tar.gz with code/inference.py")
    result = package_model(model.path, out / "model.tar.gz", code_dir=_EXAMPLE_CODE)
    rows.append(("model.tar.gz", result.path, f"{result.seconds:.1f} s, {result.bytes_out / 2**20:.1f} MiB"))

    t = _step("4. import the archive back into the store")
    back = resolve_model(str(out / "model.tar.gz"), settings)
    rows.append(("store import", f"{back.name} -> {back.path}", f"{time.perf_counter() - t:.1f} s"))
    console.print(f"imported as [bold]{back.name}[/bold], digest {back.digest[:12]}")

    if deploy:
        t = _step("5. deploy an endpoint and invoke it (boto3 sagemaker + sagemaker-runtime)")
        for path in _deploy_and_invoke(settings, out / "model.tar.gz", out, steps):
            rows.append(("endpoint image", str(path), ""))
        rows.append(("deploy + invoke", str(out / "daemon.log"), f"{time.perf_counter() - t:.1f} s"))

    table = Table(title="sdmaker demo: where everything went")
    for col in ("what", "where", "time"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if not real:
        console.print("[yellow]Images are noise: the built-in model's weights were not found.[/yellow]")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
