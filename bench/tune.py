"""``model tune``: the calibration of its quality bar, and the tuner rediscovering a known answer.

1. **Calibration** (on ``mini``, whose pictures a judge can score: ``sdmaker eval``'s analyser). The
   reference recipe (the model's own scheduler, 50 steps, fp32, DeepCache off) and a spread of faster
   recipes, from harmless to picture-breaking, generate the held-out eval prompts with the same seeds.
   For each recipe: the judge's score (points, as ``sdmaker eval``) and the tuner's metric (mean
   ``1 - SSIM`` to the reference images). The bar is the largest distance at which every recipe at or
   below it scores within 1 point of the reference: the distances of passing recipes below the nearest
   failing one. ``sdmaker.tuning.QUALITY_THRESHOLD`` is set from this row.
2. **Rediscovery**: ``tune`` on a copy of ``mini`` stripped of its ``sdmaker.json`` recipe (scheduler,
   steps, DeepCache; :data:`STRIPPED_KEYS`) must pick a recipe >= 4x faster than fp32/50 steps, and the
   judge must score it within 1 point of the reference.
3. **Keeps the reference**: on a random-weight SD 1.x-architecture model (every faster recipe changes
   its pictures) the tuner must keep the reference recipe.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import row

__all__ = ["CALIBRATION_RECIPES", "calibrate", "calibration_rows", "rediscovery_rows", "run", "threshold_from"]

logger = logging.getLogger(__name__)

BAR_POINTS = 1.0
EVAL_BATCH = 16
#: What the rediscovery strips from mini's card: the recipe the tuner searches. Size and guidance (2.5) stay:
#: they are the model's, not the recipe's; at the seed's guidance 7.5, which mini was not trained for, even
#: bf16 at 50 steps moves its pictures by 1-SSIM 0.022 (measured), far past the bar calibrated at 2.5.
STRIPPED_KEYS = ("scheduler", "num_inference_steps", "deep_cache_interval")
#: (scheduler, steps, DeepCache interval, dtype): harmless to picture-breaking, on mini.
CALIBRATION_RECIPES: list[tuple[str, int, int, str]] = [
    ("dpmpp_2m", 50, 0, "bf16"), ("dpmpp_2m", 20, 0, "fp32"), ("dpmpp_2m", 10, 0, "fp32"),
    ("dpmpp_2m", 10, 2, "bf16"), ("dpmpp_2m", 10, 3, "bf16"), ("dpmpp_2m", 10, 5, "bf16"),
    ("dpmpp_2m", 6, 0, "fp32"), ("dpmpp_2m", 4, 0, "fp32"), ("dpmpp_2m", 3, 0, "fp32"), ("dpmpp_2m", 2, 0, "fp32"),
    ("unipc", 5, 0, "fp32"), ("ddim", 10, 0, "fp32"), ("ddim", 4, 0, "fp32"), ("euler", 10, 0, "fp32"),
    ("euler", 4, 0, "fp32"), ("pndm", 10, 0, "fp32"), ("pndm", 6, 0, "fp32"), ("euler_a", 20, 0, "fp32"),
]
QUICK_RECIPES = [r for r in CALIBRATION_RECIPES if r not in (("dpmpp_2m", 20, 0, "fp32"), ("euler", 10, 0, "fp32"),
                                                              ("ddim", 10, 0, "fp32"))]


def _generate(model: Any, items: list[Any], *, scheduler: str | None, steps: int, dc: int) -> tuple[np.ndarray, float]:
    """(NHWC float images, judge points) for the eval ``items``, seeds as ``sdmaker eval`` gives them."""
    from sdmaker.engine import generate
    from sdmaker.schema import parse_request
    from sdmaker.training._analyser import analyse
    from sdmaker.training._eval import score_item, summarise

    arrays: list[np.ndarray] = []
    scores: list[dict[str, Any]] = []
    for start in range(0, len(items), EVAL_BATCH):
        chunk = items[start:start + EVAL_BATCH]
        data: dict[str, Any] = {"prompt": [it.prompt for it in chunk], "seed": start, "format": "png",
                                "num_inference_steps": steps, "deep_cache_interval": dc}
        if scheduler is not None:
            data["scheduler"] = scheduler
        result = generate(model, parse_request(data).resolve(model.defaults))
        assert result.arrays is not None
        arrays.append(result.arrays)
        scores += [score_item(it, analyse(img.image)) for it, img in zip(chunk, result.images, strict=True)]
    metrics, _ = summarise(items, scores)
    return np.concatenate(arrays), 100.0 * metrics["overall"]


def threshold_from(points: list[dict[str, Any]], bar: float = BAR_POINTS) -> float:
    """The largest distance at which every recipe at or below it stays within ``bar`` points.

    ``points``: ``{"distance", "delta"}`` per recipe (delta = score - reference score). Recipes are taken
    in order of distance until the first one that fails; the bar is the last passing distance before it.
    """
    threshold = 0.0
    for p in sorted(points, key=lambda p: p["distance"]):
        if p["delta"] < -bar:
            break
        threshold = p["distance"]
    return threshold


def calibrate(model_dir: Path, *, n: int, recipes: list[tuple[str, int, int, str]]) -> dict[str, Any]:
    """Scores and distances of ``recipes`` on ``n`` eval prompts; the threshold they imply."""
    from sdmaker.engine import load_model
    from sdmaker.training._eval import eval_prompts
    from sdmaker.tuning import image_distances

    items = eval_prompts(n)
    models = {"fp32": load_model(model_dir, dtype="fp32", digest="-")}
    if any(r[3] == "bf16" for r in recipes):
        models["bf16"] = load_model(model_dir, dtype="bf16", digest="-")
    ref = models["fp32"]
    started = time.perf_counter()
    ref_arrays, ref_score = _generate(ref, items, scheduler=ref.default_scheduler, steps=50, dc=0)
    ref_s = time.perf_counter() - started
    points: list[dict[str, Any]] = []
    for scheduler, steps, dc, dtype in recipes:
        arrays, score = _generate(models[dtype], items, scheduler=scheduler, steps=steps, dc=dc)
        distance = float(np.mean(image_distances(arrays, ref_arrays)))
        points.append({"recipe": f"{scheduler} {steps}" + (f" + DeepCache {dc}" if dc > 1 else "") + f", {dtype}",
                       "distance": round(distance, 5), "score": round(score, 2), "delta": round(score - ref_score, 2)})
        logger.info("calibration: %s", points[-1])
    return {"n": n, "reference_score": round(ref_score, 2), "reference_s": round(ref_s, 1), "points": points,
            "threshold": threshold_from(points)}


def _stripped_mini(dest: Path) -> Path:
    from sdmaker.models import assemble_builtin

    folder = assemble_builtin("mini", dest)
    card_path = folder / "sdmaker.json"
    card = json.loads(card_path.read_text())
    for key in STRIPPED_KEYS:
        card["defaults"].pop(key, None)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return folder


def _tune_folder(folder: Path) -> Any:
    from sdmaker.engine import cpu_has_native_bf16, load_model
    from sdmaker.tuning import tune

    def load(dtype: str) -> Any:
        return load_model(folder, dtype=dtype, digest="-")

    return tune(load, dtypes=["bf16"] if cpu_has_native_bf16() else [])


def calibration_rows(cal: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of one :func:`calibrate` result: each recipe's judge score and distance, then the threshold."""
    from sdmaker.tuning import QUALITY_THRESHOLD

    rows: list[dict[str, Any]] = []
    for p in sorted(cal["points"], key=lambda p: p["distance"]):
        ok = p["delta"] >= -BAR_POINTS
        rows.append(row(f"tune calibration: {p['recipe']}", p["score"], cal["reference_score"], "points",
                        f"1-SSIM to the reference {p['distance']:.4f}; judge {'within' if ok else 'NOT within'} "
                        f"{BAR_POINTS:g} point", lower_is_better=False))
    rows.append(row("tune calibration: threshold (largest 1-SSIM within 1 judge point)", cal["threshold"],
                    QUALITY_THRESHOLD, "1-SSIM",
                    f"n={cal['n']} eval prompts, reference dpmpp_2m 50 steps fp32 scored {cal['reference_score']} "
                    "points; baseline = sdmaker.tuning.QUALITY_THRESHOLD in the code", lower_is_better=False))
    return rows


def rediscovery_rows(n: int) -> list[dict[str, Any]]:
    """The tuner on mini stripped of its card (must find >= 4x within the bar) and on a random-weight model."""
    from sdmaker.engine import build_random_pipeline, load_model
    from sdmaker.training._eval import eval_prompts

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        folder = _stripped_mini(Path(tmp) / "mini-stripped")
        started = time.perf_counter()
        result = _tune_folder(folder)
        wall = time.perf_counter() - started
        chosen = result.chosen
        items = eval_prompts(n)
        ref_model = load_model(folder, dtype="fp32", digest="-")
        _, reference_score = _generate(ref_model, items, scheduler=ref_model.default_scheduler, steps=50, dc=0)
        check = load_model(folder, dtype=chosen.recipe.dtype, digest="-")
        _, tuned_score = _generate(check, items, scheduler=chosen.recipe.scheduler, steps=chosen.recipe.steps,
                                   dc=chosen.recipe.deep_cache_interval)
        rows.append(row(f"tune: mini without defaults picks {chosen.recipe.label()} vs fp32 50 steps",
                        chosen.seconds_per_image, result.reference.seconds_per_image, "s/image",
                        f"{len(result.candidates)} candidates, 1-SSIM {chosen.distance or 0:.4f} <= {result.threshold}; "
                        f"judge {tuned_score:.2f} vs reference {reference_score:.2f} points (n={n}); "
                        f"{50 / chosen.recipe.steps:.1f}x fewer steps; target ratio >= 4"))
        rows.append(row("tune: `model tune` wall time on mini (2 cores)", wall, 180.0, "s",
                        "target <= 180 s (baseline column); includes loading fp32 and bf16 copies"))
        shutil.rmtree(folder, ignore_errors=True)

        rnd = build_random_pipeline("sd1-tiny", Path(tmp) / "sd1-tiny")
        started = time.perf_counter()
        result = _tune_folder(rnd)
        ref = result.reference.recipe
        kept = (result.chosen.recipe.scheduler, result.chosen.recipe.steps,
                result.chosen.recipe.deep_cache_interval) == (ref.scheduler, ref.steps, 0)
        closest = min((c.distance for c in result.candidates if c.distance and c.status == "rejected"), default=None)
        rows.append(row("tune: random-weight SD1-arch model keeps its reference recipe", float(kept), 1.0, "bool",
                        f"chose {result.chosen.recipe.label()}; closest rejected 1-SSIM {closest}; "
                        f"{len(result.candidates)} candidates in {time.perf_counter() - started:.0f}s",
                        lower_is_better=False))
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    from bench.batching import mini_model_dir

    path, label = mini_model_dir()
    if label != "mini":
        return [row("tune: calibration", None, None, "1-SSIM", "NOT MEASURED: the built-in mini's weights are missing")]
    n = 32 if quick else 128
    cal = calibrate(path, n=n, recipes=QUICK_RECIPES if quick else CALIBRATION_RECIPES)
    return calibration_rows(cal) + rediscovery_rows(n)
