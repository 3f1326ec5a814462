"""Endpoint logs are capped by copytruncate rotation, and writers holding the file keep writing to it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sdmaker.serving.daemon._logs import rotate_if_large


def test_rotation_keeps_the_old_text_and_the_writer_goes_on_at_the_start(tmp_path: Path) -> None:
    log = tmp_path / "endpoint.log"
    with open(log, "ab") as writer:  # how a worker's stdout is opened
        writer.write(b"a" * 100 + b"\n")
        writer.flush()
        assert not rotate_if_large(log, 1000)
        assert rotate_if_large(log, 50)
        writer.write(b"after\n")
        writer.flush()
    assert log.read_bytes() == b"after\n"  # no hole of NUL bytes where the old text was
    assert (tmp_path / "endpoint.log.1").read_bytes() == b"a" * 100 + b"\n"


def test_old_copies_shift_and_only_two_are_kept(tmp_path: Path) -> None:
    log = tmp_path / "endpoint.log"
    for i in range(4):
        log.write_bytes(str(i).encode() * 10)
        assert rotate_if_large(log, 5)
    assert (tmp_path / "endpoint.log.1").read_bytes() == b"3" * 10
    assert (tmp_path / "endpoint.log.2").read_bytes() == b"2" * 10
    assert not (tmp_path / "endpoint.log.3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endpoint.log", "endpoint.log.1", "endpoint.log.2"]


def test_zero_means_never_and_a_missing_log_is_fine(tmp_path: Path) -> None:
    log = tmp_path / "endpoint.log"
    assert not rotate_if_large(log, 10)
    log.write_bytes(b"x" * 100)
    assert not rotate_if_large(log, 0)
    assert log.stat().st_size == 100


def test_a_child_process_writing_its_stdout_to_the_log_is_capped(tmp_path: Path) -> None:
    """The real case: a worker process whose stdout is the log, rotated while it runs."""
    log = tmp_path / "endpoint.log"
    script = "import sys\nfor i in range(2000):\n    print('line', i, flush=True)\n    sys.stdin.readline() if i == 999 else None\n"
    with open(log, "ab") as out:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=out, stdin=subprocess.PIPE)
    assert child.stdin is not None
    deadline = time.monotonic() + 60
    while b"line 999\n" not in log.read_bytes():  # the child is now blocked on stdin
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    assert rotate_if_large(log, 4096)
    child.communicate(b"\n", timeout=60)
    text = log.read_text()
    assert text.startswith("line 1000\n") and text.endswith("line 1999\n")
    assert (tmp_path / "endpoint.log.1").read_text().endswith("line 999\n")
