"""Smoke mode of every benchmark on tiny shapes, so none of them rots between real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import row


@pytest.fixture(scope="module")
def sd2_model(sd2_dir: Path):  # type: ignore[no-untyped-def]
    from sdmaker.engine import load_model

    return load_model(sd2_dir, dtype="fp32", digest="-")  # the <= 1 level bar below is an fp32 fact


def _check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert set(r) == {"name", "ours", "baseline", "unit", "ratio", "notes"}
        if r["ours"] and r["baseline"]:  # a zero (e.g. no pixel difference at all) has no ratio
            assert r["ratio"] is not None and r["ratio"] > 0


def test_row_ratio_direction() -> None:
    assert row("t", 2.0, 8.0, "s")["ratio"] == 4.0  # time: baseline / ours
    assert row("r", 3.0, 1.5, "img/s")["ratio"] == 2.0  # rate: ours / baseline
    assert row("n", None, 1.0, "s")["ratio"] is None


@pytest.mark.slow
def test_engine_smoke(sd2_dir: Path) -> None:
    from bench.engine import gemm_peak, measure

    assert gemm_peak("fp32", 64, repeat=1) > 0
    recipe = {"scheduler": "dpmpp_2m", "num_inference_steps": 3, "deep_cache_interval": 2, "deep_cache_branch": 2}
    rows = measure(sd2_dir, sd2_dir, size=64, quick=True, gemm_n=128, label="tiny", recipe=recipe, real_e2e=True)
    _check_rows(rows)
    names = " ".join(r["name"] for r in rows)
    for part in ("GEMM peak", "UNet step", "GEMM floor", "VAE decode", "text encode", "DeepCache", "headline"):
        assert part in names
    flops = [r for r in rows if r["name"].startswith("UNet step") and "TFLOP" in r["notes"]]
    assert flops and "0.00 TFLOP" not in flops[0]["notes"] or flops


def test_batching_smoke(sd2_model) -> None:  # type: ignore[no-untyped-def]
    from bench.batching import _requests, compare

    rows = compare(sd2_model, _requests(4, 2, 64, sd2_model), clients=3, max_batch=2, label="tiny")
    _check_rows(rows)
    diff = next(r for r in rows if "pixel diff" in r["name"])
    assert diff["ours"] <= 1


@pytest.mark.slow
def test_quality_smoke(minilm_dir: Path) -> None:
    from bench.quality import choose_recipe, curves_rows
    from sdmaker.engine import load_model

    model = load_model(minilm_dir, digest="-")
    rows = curves_rows(model, "tiny", n=2, grid=[2, 3], intervals=[2], write=False, size=64, base_steps=3)
    _check_rows(rows)
    assert any(r["name"].startswith("quality: ddim") for r in rows)
    curves = {"a": {5: 80.0, 10: 89.5, 20: 90.0}, "b": {5: 89.6, 10: 88.0, 20: 90.0}}
    assert choose_recipe(curves, 90.0) == {"scheduler": "a", "num_inference_steps": 10}  # b dips at 10
    tie = {"a": {10: 89.2, 20: 90.0}, "b": {10: 89.8, 20: 90.0}}
    assert choose_recipe(tie, 90.0)["scheduler"] == "b"  # same steps: the more accurate one
    assert any(r["name"].startswith("quality: default recipe") for r in rows)


def test_runner_writes_results_and_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.__main__ as runner
    from bench.readme_table import render, replace_block

    fake = {"engine": [row("UNet step", 1.0, 3.0, "s/step", "n")], "batching": [row("img/s", 2.0, 1.0, "img/s")]}
    monkeypatch.setattr(runner, "run_module", lambda name, quick: fake.get(name, []))
    out = tmp_path / "results.json"
    assert runner.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"cpu_model", "cores", "date", "torch"} <= set(data["metadata"])
    assert [r["name"] for r in data["results"]] == ["UNet step", "img/s"]
    # --only keeps the other modules' rows
    fake["engine"] = [row("UNet step", 0.5, 3.0, "s/step")]
    assert runner.main(["--only", "engine", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert sorted(r["name"] for r in data["results"]) == ["UNet step", "img/s"]
    # each module's rows name the run they come from, across several partial re-runs
    runs = data["metadata"]["module_runs"]
    assert runs["engine"].startswith("`python -m bench` of") and runs["batching"].startswith("`python -m bench --quick`")
    assert runner.main(["--quick", "--only", "batching", "--out", str(out)]) == 0
    again = json.loads(out.read_text())["metadata"]
    assert again["module_runs"]["engine"] == runs["engine"] and "engine rows come from `python -m bench` of" in again["note"]
    table = render(data)
    assert "| UNet step | 0.5 | 3 | s/step | **6x** |" in table and data["metadata"]["cpu_model"] in table
    readme = replace_block("# x\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n", table)
    assert "old" not in readme and readme.endswith("after\n")


def test_reliability_corpus_and_shape_checks() -> None:
    """bench.reliability's corpus is deterministic and its verdicts say what a clean AWS error is."""
    import io

    from PIL import Image

    from bench.reliability import Case, Reply, error_shape_problems, generated_cases, huge_png, seen_cases

    assert [c.body for c in generated_cases(50)] == [c.body for c in generated_cases(50)]
    assert {c.surface for c in generated_cases(200)} == {"runtime", "control"}
    labels = " ".join(c.label for c in seen_cases(big=False))
    for seen in ("depth 1000", "lone surrogate", "utf-16", "[\"x\"]", "[null]", "MaxResults", "SortBy", "NextToken",
                 '"64"', "-0.0", "1e-400", "true"):
        assert seen in labels
    with Image.open(io.BytesIO(huge_png(1700, 1000))) as im:  # same builder, smaller: a valid PNG header
        assert im.size == (1700, 1000)
    rt = Case("x", "runtime", b"{}")
    clean = Reply(400, {"x-amzn-errortype": "ValidationError"}, b'{"message": "height: bad"}', connection_reusable=True)
    assert error_shape_problems(rt, clean) == []
    assert error_shape_problems(rt, Reply(500, {}, b"Internal Server Error", connection_reusable=True))
    assert any("424" in p for p in error_shape_problems(rt, Reply(424, {"x-amzn-errortype": "ModelError"},
                                                                   b'{"message": "m"}', connection_reusable=True)))
    assert error_shape_problems(rt, Reply(None, error="reset"))
    assert error_shape_problems(rt, Reply(400, {"x-amzn-errortype": "ValidationError"}, b'{"message": "m"}',
                                          connection_reusable=False))
    cp = Case("x", "control", b"{}", target="ListEndpoints")
    assert error_shape_problems(cp, Reply(400, {}, b'{"__type": "ValidationException", "message": "m"}',
                                          connection_reusable=True)) == []
    wk = Case("x", "worker", b"{}")
    assert error_shape_problems(wk, Reply(400, {}, b'{"code": 400, "type": "BadRequest", "message": "m"}',
                                          connection_reusable=True)) == []


def test_progress_preview_cost_smoke() -> None:
    from bench.progress import preview_cost

    rows = preview_cost(True, repeats=1, steps=2)
    _check_rows(rows)
    assert "approx preview" in rows[0]["name"] and "VAE decode" in rows[0]["notes"]


def test_edit_strength_smoke(sd2_model) -> None:  # type: ignore[no-untyped-def]
    from bench.edit import _strength_rows

    rows = _strength_rows(sd2_model, quick=True, steps=4, images=1)
    _check_rows(rows)
    assert "UNet calls 2 vs 4" in rows[0]["notes"]


def test_lora_eval_smoke() -> None:
    """The shipped adapter against mini alone on two prompts per set: both passes ran and the rows are whole."""
    from bench.lora_eval import judge, rows

    got = judge(2)
    assert set(got) == {"without", "with", "kinds"}
    assert all(set(got[v]) == {"concept", "base"} for v in ("without", "with"))
    assert all(0.0 <= m["overall"] <= 1.0 for v in ("without", "with") for m in got[v].values())
    assert got["kinds"] and all(0.0 <= m["drawn"] <= 1.0 for m in got["kinds"].values())
    _check_rows(rows(got, 2))
    assert "by what the prompt asks" in rows(got, 2)[0]["notes"]


def test_attention_paths_smoke() -> None:
    """Every CPU attention path the attention bench times agrees with fp32 SDPA on a small shape (the module
    raises if one does not) and gets a positive time."""
    from bench.attention import attention_paths

    got = attention_paths(256, heads=2, repeat=1, compiled=False)
    assert {"sdpa", "chunked matmul-softmax-matmul"} <= set(got) and all(v > 0 for v in got.values())


def test_openvino_engine_served_smoke(sd2_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from bench.openvino_engine import served_rows
    from sdmaker.engine import load_model

    model = load_model(sd2_dir, dtype="fp32", digest="-")
    recipe = {"scheduler": "dpmpp_2m", "num_inference_steps": 4, "deep_cache_interval": 2}
    rows = served_rows(model, recipe, size=64, rounds=1, cache=tmp_path, name="tiny")
    _check_rows(rows)
    assert rows[0]["ours"] is not None and rows[0]["baseline"] is not None, rows
    assert "converted in" in rows[0]["notes"] and model.step_compiler is None
