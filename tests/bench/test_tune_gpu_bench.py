"""CPU-side parts of the tune, peers and GPU benchmarks: the calibration rule, argument parsing, the JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_threshold_is_the_last_passing_distance_before_the_first_failure() -> None:
    from bench.tune import threshold_from

    points = [{"distance": 0.02, "delta": 0.0}, {"distance": 0.05, "delta": -0.8}, {"distance": 0.09, "delta": -3.0},
              {"distance": 0.20, "delta": 0.0}]  # a far recipe that happens to score well does not raise the bar
    assert threshold_from(points) == 0.05
    assert threshold_from([{"distance": 0.01, "delta": -2.0}]) == 0.0
    assert threshold_from([{"distance": 0.3, "delta": 0.5}]) == 0.3


def test_gpu_arguments() -> None:
    from bench.gpu import parse_args

    args = parse_args([])
    assert (args.size, args.steps, args.out.name) == (512, 50, "results-gpu.json")
    with pytest.raises(SystemExit):
        parse_args(["--size", "500"])
    dry = parse_args(["--dry-run", "--size", "768"])
    assert (dry.size, dry.steps) == (64, 2)


@pytest.mark.slow
def test_gpu_dry_run_writes_the_results_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU script's code path on the CPU with the tiny model: every row and the metadata the README needs."""
    import bench.__main__ as runner

    monkeypatch.setenv("SDMAKER_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results-gpu.json"
    assert runner.main(["--gpu", "--dry-run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"cpu_model", "date", "torch", "mode", "size", "wall_s"} <= set(data["metadata"])
    assert data["metadata"]["mode"] == "dry-run"
    names = [r["name"] for r in data["results"]]
    assert any("E2E" in n and "vs fp32" in n for n in names) and any("UNet step" in n for n in names)
    assert any("batching" in n for n in names)
    for r in data["results"]:
        assert set(r) == {"name", "ours", "baseline", "unit", "ratio", "notes"}


def test_peers_name_the_cpu_flags() -> None:
    from bench.peers import cpu_flags

    flags = cpu_flags()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert all(f in text for f in flags)
