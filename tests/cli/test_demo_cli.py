"""``sdmaker demo`` (what ``make demo`` runs) on a busy machine, twice in a row in the same folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdmaker.cli._demo import DEMO_TIMEOUT_S


@pytest.mark.slow
def test_demo_passes_twice_in_a_row_beside_a_cpu_hog(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    env = {**os.environ, "SDMAKER_HOME": str(tmp_path / "home")}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a busy core, as on a shared machine
    try:
        for run in (1, 2):  # the second run meets the first one's files and daemon state
            res = subprocess.run([sys.executable, "-m", "sdmaker", "demo", "--out", str(out)], env=env,
                                 capture_output=True, text=True, timeout=1800)
            assert res.returncode == 0, f"run {run}:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
            assert "where everything went" in res.stdout
            assert f"{DEMO_TIMEOUT_S} s invocation timeout" in res.stdout  # it says what it chose
            assert (out / "endpoint-0.jpg").is_file() and (out / "contact-sheet.png").is_file()
    finally:
        hog.kill()
        hog.wait()


def test_a_failing_demo_prints_the_table_the_failed_step_and_the_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from sdmaker.cli import _demo, app
    from sdmaker.cli._common import run_app

    monkeypatch.setenv("SDMAKER_HOME", str(tmp_path / "home"))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the contact sheet broke")

    monkeypatch.setattr(_demo, "_contact_sheet", broken)
    assert run_app(app, ["demo", "--out", str(tmp_path / "out"), "--no-deploy"]) == 1
    captured = capsys.readouterr()
    assert "sdmaker demo: FAILED" in captured.out  # the table is printed on failure too
    assert "model" in captured.out and "contact sheet: FAILED" in captured.out
    assert "RuntimeError: the contact sheet broke" in captured.out
    assert "the demo failed: RuntimeError: the contact sheet broke" in captured.err
