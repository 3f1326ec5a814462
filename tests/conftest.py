"""Shared fixtures: tiny random-weight Stable Diffusion folders and an isolated SDMAKER_HOME.

Models are built once per test session (a few seconds each) from architecture configs; no test
downloads anything. Helpers append fixtures below; existing fixtures keep their behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a model hub (no network here) nor wait on its timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


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

    return load_model(sd1_dir)


@pytest.fixture
def sdmaker_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SDMAKER_HOME for the test (set in the environment for CLI and subprocesses)."""
    home = tmp_path / "sdmaker-home"
    home.mkdir()
    monkeypatch.setenv("SDMAKER_HOME", str(home))
    return home


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
        "unet/diffusion_pytorch_model.safetensors": rng.randbytes(weight_bytes),
        "vae/diffusion_pytorch_model.safetensors": rng.randbytes(weight_bytes // 2),
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
