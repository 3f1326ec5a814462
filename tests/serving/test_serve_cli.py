"""``sdmaker serve``: refusals before any model work, and a real foreground server driven with ``requests``."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from sdmaker.cli import app
from sdmaker.cli._common import run_app


def test_non_loopback_without_token_is_refused_before_loading(sdmaker_home: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = run_app(app, ["serve", "no-such-model-anywhere", "--host", "0.0.0.0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and "--token" in err  # the model was never looked up


def test_unknown_model_is_a_clear_error(sdmaker_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a path long enough to pass any terminal's width: the error must quote it whole, on one line, however
    # long the temp folder's name is (pytest-0 on a fresh machine, pytest-1234 on a long-used one)
    missing = sdmaker_home / ("a-long-folder-name-" * 6) / "missing-folder"
    code = run_app(app, ["serve", str(missing), "--port", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "│" not in err  # no box around the message


def test_missing_requirements_refused_with_no_install(sdmaker_home: Path, sd1_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    shutil.copytree(sd1_dir, model)
    shutil.copytree(Path(__file__).parent / "fixtures" / "requirements_missing" / "code", model / "code")
    code = run_app(app, ["serve", str(model), "--no-install", "--port", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "sdmaker-test-missing-package-zzz==1.0 (not installed)" in err and "relax the pins" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_in_the_foreground(sd1_dir: Path, sdmaker_home: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny-sd"
    shutil.copytree(sd1_dir, model)
    (model / "sdmaker.json").write_text(json.dumps({"name": "tiny-sd", "defaults": {
        "height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 1.0}}))
    port = _free_port()
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port)}  # the port comes from the contract's variable
    proc = subprocess.Popen([sys.executable, "-m", "sdmaker", "serve", str(model), "--token", "tok"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer tok"}
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "serve never became healthy"
            try:
                if requests.get(f"{base}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        assert requests.post(f"{base}/invocations", json={"prompt": "x"}, timeout=30).status_code == 403
        reply = requests.post(f"{base}/invocations", json={"prompt": "a lighthouse", "seed": 2}, headers=auth,
                              timeout=120)
        assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/json"
        body = reply.json()
        assert body["model"] == "tiny-sd" and body["seeds"] == [2]
        image = Image.open(io.BytesIO(base64.b64decode(body["generated_images"][0])))
        assert (image.format, image.size) == ("JPEG", (64, 64))
        raw = requests.post(f"{base}/invocations", json={"inputs": "a lighthouse"}, timeout=120,
                            headers={**auth, "Accept": "image/jpeg"})
        assert raw.headers["Content-Type"] == "image/jpeg" and raw.content[:3] == b"\xff\xd8\xff"
        bad = requests.post(f"{base}/invocations", json={"prompt": "x", "width": 12}, headers=auth, timeout=30)
        assert bad.status_code == 400 and bad.json()["field"] == "width"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(timeout=60)
    assert code == 0
