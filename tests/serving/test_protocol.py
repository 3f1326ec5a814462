"""The daemon-worker contract: one WorkerConfig line, the validation mark, the image count from headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sdmaker.serving import WorkerConfig
from sdmaker.serving._protocol import VALIDATED_HEADER, trusts_validation
from sdmaker.serving.daemon._invoke_api import _count_images


def test_worker_config_is_one_json_line_both_ways(tmp_path: Path) -> None:
    config = WorkerConfig(model_dir=tmp_path, port=8123, model_name="m", model_digest="sha256:ab", device="cpu",
                          max_batch=4, environment={"OMP_NUM_THREADS": "1"}, log_file=tmp_path / "ep.log")
    line = config.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert WorkerConfig.from_line(line) == config
    assert config.handler_threads == 4  # enough threads for max_batch requests to reach the batcher


def test_worker_config_refuses_unknown_or_bad_fields(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="max_bach"):
        WorkerConfig.from_line(f'{{"model_dir": "{tmp_path}", "port": 1, "max_bach": 2}}')
    with pytest.raises(ValidationError, match="port"):
        WorkerConfig(model_dir=tmp_path, port=70000)


def test_validation_mark_is_believed_only_by_daemon_workers(tmp_path: Path) -> None:
    serve = WorkerConfig(model_dir=tmp_path, port=1)
    daemon = serve.model_copy(update={"trust_daemon_validation": True})
    assert not trusts_validation(serve, {VALIDATED_HEADER: "1"})
    assert trusts_validation(daemon, {VALIDATED_HEADER.lower(): "1"})
    assert not trusts_validation(daemon, {})
    assert not trusts_validation(daemon, {VALIDATED_HEADER: "yes"})


def test_image_count_comes_from_the_seeds_header() -> None:
    assert _count_images("application/json", {"x-sdmaker-seeds": "1,2,3"}) == 3
    assert _count_images("image/png", {"x-sdmaker-seeds": "9"}) == 1
    assert _count_images("image/png", {}) == 1
    assert _count_images("application/json", {}) == 0  # a custom handler's JSON: not read on the event loop
