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
