"""Shared fixtures: tiny random-weight Stable Diffusion folders and an isolated SDMAKER_HOME.

Models are built once per test session (a few seconds each) from architecture configs; no test
downloads anything. Helpers append fixtures below; existing fixtures keep their behaviour.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

# Tests must never reach a model hub (no network here) nor wait on its timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _share_cores_between_test_processes() -> None:
    """Each pytest-xdist process gets its share of the cores as torch threads, as the daemon's workers do.

    ``make test`` runs more test processes than cores (most tests wait on subprocesses and sockets). With every
    process sizing torch's OpenMP team to all the cores, the cores were oversubscribed whenever two computed at
    once, and OpenMP teams stall at each barrier for a displaced thread: the suite took 20-23 min on 2 cores,
    13 min with one thread each and one more process. Daemons and workers that tests start inherit it.
    """
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if count <= 1:
        return
    threads = str(max(1, len(os.sched_getaffinity(0)) // count))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_between_test_processes()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with slow tests first (their order inside a module kept).

    Under ``make test`` (pytest-xdist, ``--dist loadfile``) xdist then reorders modules by their number of
    tests, so this order applies to single-process runs; forcing the longest modules first under xdist was
    measured slower (16 min 31 s against 14-17 min), since they all load the machine at once.
    """
    slow_modules = {item.module.__name__ for item in items if item.module is not None and item.get_closest_marker("slow")}
    items.sort(key=lambda item: 0 if item.module is not None and item.module.__name__ in slow_modules else 1)


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _build(root: Path, kind: str) -> Path:
    from sdmaker.engine import build_random_pipeline

    out = root / kind
    if not (out / "model_index.json").exists():
        build_random_pipeline(kind, out)
    return out


@pytest.fixture(scope="session")
def sd1_dir(tiny_models_root: Path) -> Path:
    """SD 1.x-style tiny model: epsilon prediction, PNDM, CLIP text encoder + real CLIP tokenizer."""
    return _build(tiny_models_root, "sd1-tiny")


@pytest.fixture(scope="session")
def sd2_dir(tiny_models_root: Path) -> Path:
    """SD 2.x-style tiny model: v-prediction, DDIM, linear projections."""
    return _build(tiny_models_root, "sd2-tiny")


@pytest.fixture(scope="session")
def minilm_dir(tiny_models_root: Path) -> Path:
    """Tiny UNet conditioned on the pretrained MiniLM text encoder."""
    return _build(tiny_models_root, "minilm-tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(sd1_dir: Path) -> Path:
    """The default tiny model for tests that need any loadable model."""
    return sd1_dir


@pytest.fixture(scope="session")
def sd1_model(sd1_dir: Path):  # type: ignore[no-untyped-def]
    from sdmaker.engine import load_model

    return load_model(sd1_dir, dtype="fp32")  # exact comparisons below are fp32 facts


@pytest.fixture
def sdmaker_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SDMAKER_HOME for the test (set in the environment for CLI and subprocesses)."""
    home = tmp_path / "sdmaker-home"
    home.mkdir()
    monkeypatch.setenv("SDMAKER_HOME", str(home))
    return home


# --- real processes on loopback: a moto S3 server and the sdmaker daemon (added by the daemon helper) ----------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc, timeout_s: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A moto S3 server on a free 127.0.0.1 port; yields its URL (use dummy credentials, region us-east-1)."""
    import subprocess
    import sys

    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/moto-api/", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class DaemonProcess:
    """``sdmaker up`` as a real process on a free 127.0.0.1 port with its own SDMAKER_HOME."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.home = home
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SDMAKER_HOME": str(home), "SDMAKER_PORT": str(self.port),
                    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", **(env or {})}
        self.proc = None
        self.log = home / "daemon-test.log"

    def start(self) -> DaemonProcess:
        import subprocess
        import sys

        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "up", "--host", "127.0.0.1",
                                          "--port", str(self.port)], env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT)
        _wait_http(self.url + "/ping", self.proc)
        return self

    def stop(self, sig: int | None = None) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - never leave a daemon behind
                self.proc.kill()
                self.proc.wait()

    def boto(self, service: str, **kwargs):  # type: ignore[no-untyped-def]
        """A boto3 client for ``sagemaker`` or ``sagemaker-runtime`` pointed at this daemon (no retries)."""
        import boto3
        from botocore.config import Config

        config = Config(read_timeout=120, retries={"max_attempts": 1, "mode": "standard"})
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", config=config,
                            aws_access_key_id=kwargs.pop("key", "testing"),
                            aws_secret_access_key=kwargs.pop("secret", "testing"), **kwargs)

    def deploy(self, name: str, model: str | Path, *, count: int = 1, env: dict[str, str] | None = None,
               instance_type: str = "ml.m5.large", wait: bool = True, **boto_kwargs: str) -> dict:
        """CreateModel + CreateEndpointConfig + CreateEndpoint named ``name`` (config/model ``name-v1``)."""
        sm = self.boto("sagemaker", **boto_kwargs)
        sm.create_model(ModelName=f"{name}-v1", ExecutionRoleArn="arn:aws:iam::111122223333:role/sm",
                        PrimaryContainer={"Image": "sdmaker", "ModelDataUrl": str(model), "Environment": env or {}})
        sm.create_endpoint_config(EndpointConfigName=f"{name}-v1", ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": f"{name}-v1", "InitialInstanceCount": count,
            "InstanceType": instance_type}])
        sm.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-v1")
        if wait:
            from botocore.exceptions import WaiterError

            # a Failed endpoint ends the waiter with an error; callers assert on the description instead
            with contextlib.suppress(WaiterError):
                sm.get_waiter("endpoint_in_service").wait(EndpointName=name,
                                                          WaiterConfig={"Delay": 0.5, "MaxAttempts": 600})
        return sm.describe_endpoint(EndpointName=name)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, moto_server: str):  # type: ignore[no-untyped-def]
    """One shared daemon for the serving/client tests (S3 pointed at the moto server)."""
    d = DaemonProcess(tmp_path_factory.mktemp("daemon-home"),
                      env={"AWS_ENDPOINT_URL_S3": moto_server, "HF_HUB_OFFLINE": "1"})
    d.start()
    yield d
    d.stop()


_SCRIPTED_INFERENCE = '''\
# A model whose behaviour the request chooses: sleep, fail, die or echo (no weights to load).
import json
import os
import time


def model_fn(model_dir):
    delay = float(os.environ.get("SCRIPTED_LOAD_SECONDS", "0"))
    time.sleep(delay)
    if os.environ.get("SCRIPTED_LOAD_FAIL"):
        raise RuntimeError(os.environ["SCRIPTED_LOAD_FAIL"])
    return {"pid": os.getpid(), "version": os.environ.get("SCRIPTED_VERSION", "1")}


def predict_fn(data, model):
    time.sleep(float(data.get("sleep", 0)))
    if data.get("fail"):
        raise ValueError(data["fail"])
    if data.get("exit"):
        os._exit(9)
    return {"echo": data, "pid": model["pid"], "version": model["version"], "omp": os.environ.get("OMP_NUM_THREADS"),
            "secrets_seen": sorted(k for k in os.environ if k in ("SDMAKER_API_TOKEN", "SDMAKER_SECRET_ACCESS_KEY"))}


def output_fn(prediction, accept):
    return json.dumps(prediction)
'''


@pytest.fixture(scope="session")
def scripted_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A code-only model (code/inference.py) whose requests choose to sleep, fail, exit or echo."""
    root = tmp_path_factory.mktemp("scripted-model")
    (root / "code").mkdir()
    (root / "code" / "inference.py").write_text(_SCRIPTED_INFERENCE)
    return root


@pytest.fixture(scope="session")
def seed_model_dir(tmp_path_factory: pytest.TempPathFactory, sd1_dir: Path) -> Path:
    """The tiny SD1 model with the seed article's code/inference.py (examples/seed/code, CPU device line)."""
    import shutil

    root = tmp_path_factory.mktemp("seed-model") / "model"
    shutil.copytree(sd1_dir, root)
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "seed" / "code", root / "code")
    return root


# --- model store / S3 helpers (added by the store helper) -------------------------------------------------


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the shared moto server; the AWS env points boto3 (and sdmaker) at it."""
    import uuid

    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": moto_server}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def start_builtin_s3_daemon(home: Path, env: dict[str, str] | None = None) -> DaemonProcess:
    """A started daemon with no S3 of the user's own configured: it serves S3 itself (and reads model data
    from it). ``env``: more of the daemon's environment. The caller stops it."""
    d = DaemonProcess(home, env={"HF_HUB_OFFLINE": "1", "AWS_CONFIG_FILE": str(home / "no-aws-config"), **(env or {})})
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        d.env.pop(name, None)
    d.start()
    return d


def safetensors_bytes(payload: bytes, name: str = "weight") -> bytes:
    """A valid safetensors file holding ``payload`` as one U8 tensor (the store checks headers at import)."""
    import json
    import struct

    header = json.dumps({name: {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    return struct.pack("<Q", len(header)) + header + payload


def write_fake_model(root: Path, *, seed: int = 0, weight_bytes: int = 64 * 1024, extra: dict[str, bytes] | None = None
                     ) -> Path:
    """A diffusers-shaped folder (configs + random 'weights'), for store tests that never load the model."""
    import json
    import random

    rng = random.Random(seed)
    files: dict[str, bytes] = {
        "model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline",
                                        "text_encoder": ["transformers", "CLIPTextModel"],
                                        "tokenizer": ["transformers", "CLIPTokenizer"],
                                        "scheduler": ["diffusers", "DDIMScheduler"]}).encode(),
        "unet/config.json": json.dumps({"block_out_channels": [32, 64], "cross_attention_dim": 32,
                                        "sample_size": 8, "in_channels": 4}).encode(),
        "vae/config.json": json.dumps({"block_out_channels": [32, 64]}).encode(),
        "scheduler/scheduler_config.json": json.dumps({"prediction_type": "v_prediction"}).encode(),
        "unet/diffusion_pytorch_model.safetensors": safetensors_bytes(rng.randbytes(weight_bytes)),
        "vae/diffusion_pytorch_model.safetensors": safetensors_bytes(rng.randbytes(weight_bytes // 2)),
    }
    files.update(extra or {})
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def make_fake_model():  # type: ignore[no-untyped-def]
    """The :func:`write_fake_model` factory, for tests that need several distinct fake models."""
    return write_fake_model


@pytest.fixture
def fake_model_dir(tmp_path: Path) -> Path:
    """A small fake diffusers folder (see :func:`write_fake_model`)."""
    return write_fake_model(tmp_path / "fake-model")


# --- LoRA adapter files for a tiny UNet (added by the adapters helper) ------------------------------------------


def write_peft_lora(unet_dir: Path, out: Path, *, seed: int, targets: list[str], rank: int = 4,
                    alpha: float = 8.0) -> Path:
    """A PEFT LoRA on the UNet in ``unet_dir`` with random non-zero B, saved by diffusers' own
    ``save_lora_weights`` (keys ``unet.<module>.lora_A.weight``, rank/alpha in the header metadata)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(config)
    state = {k: v * 3 if "lora_B" in k else v for k, v in get_peft_model_state_dict(unet).items()}  # a visible delta
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state,  # type: ignore[attr-defined]
                                              unet_lora_adapter_metadata=config.to_dict())
    return out / "pytorch_lora_weights.safetensors"


def relayout_lora(src: Path, out: Path, layout: str, alpha: float) -> Path:
    """``src`` (PEFT layout) rewritten in the ``kohya`` or ``diffusers-old`` key layout, alpha as tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors: dict[str, Any] = {}
    for key, value in load_file(src).items():
        module, _, rest = key.removeprefix("unet.").rpartition(".lora_")
        down = rest.startswith("A")
        if layout == "kohya":
            stem = "lora_unet_" + module.replace(".", "_")
            tensors[f"{stem}.{'lora_down' if down else 'lora_up'}.weight"] = value
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        else:
            tensors[f"{module}.lora.{'down' if down else 'up'}.weight"] = value
            tensors[f"{module}.alpha"] = torch.tensor(alpha)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "pytorch_lora_weights.safetensors")
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def lora_files(sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA files for ``sd1_dir``: ``a`` (attention, rank 4, alpha 8), ``b`` (attention, feed-forward and
    convolutions, rank 2), and ``a`` again in the ``kohya`` and ``old`` (diffusers lora.down/up) layouts."""
    root = tmp_path_factory.mktemp("loras")
    a = write_peft_lora(sd1_dir / "unet", root / "a", seed=1, targets=["to_q", "to_k", "to_v", "to_out.0"])
    b = write_peft_lora(sd1_dir / "unet", root / "b", seed=2, targets=["to_k", "ff.net.2", "conv1", "proj_in"],
                        rank=2, alpha=2.0)
    return {"a": a, "b": b, "kohya": relayout_lora(a, root / "kohya", "kohya", 8.0),
            "old": relayout_lora(a, root / "old", "old", 8.0)}


def _checkpoint_tensors(run_dir: Path, step: int | None = None) -> dict[str, Any]:
    """Every tensor of a training run's checkpoint (weights, EMA, optimizer moments) by a flat name, to compare
    runs bit for bit; ``step`` also checks the step the checkpoint was written at."""
    import torch

    from sdmaker.training._trainer import CHECKPOINT_FILE

    ckpt = torch.load(run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    if step is not None:
        assert ckpt["step"] == step
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    out.update({f"ema.{i}": t for i, t in enumerate(ckpt["ema"])})
    for idx, st in ckpt["optimizer"]["state"].items():
        out.update({f"opt.{idx}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


@pytest.fixture
def checkpoint_tensors() -> Any:
    """:func:`_checkpoint_tensors` (a fixture: test modules cannot import one another here)."""
    return _checkpoint_tensors
