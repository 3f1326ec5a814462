"""Evaluate a scene model: generate a held-out prompt set and score the images with the analyser.

Each prompt set is a pure function of ``(n, seed)``: scenes drawn with a seed never used for training.

* ``base`` (the default): captioned only with the held-out templates (:data:`EVAL_TEMPLATES`), in four
  groups: ``one`` (one shape, trained colour/shape pairs), ``one_heldout`` (one shape of a held-out pair),
  ``two`` and ``two_heldout`` (two shapes; the latter includes at least one held-out pair).
* ``paraphrase``: the same kind of scenes (trained pairs), captioned with the held-out paraphrase templates
  and phrases (:data:`PARAPHRASE_TEMPLATES`: other words for positions, sizes, backgrounds and relations,
  other sentence shapes); groups ``para_one`` and ``para_two``.
* ``concept``: scenes featuring the opt-in concepts (a heart and/or pink, what the shipped LoRA teaches),
  captioned with the held-out templates; groups ``concept_one`` and ``concept_two``, and by what the prompt
  asks of the new words (a prompt may be in several): ``new_shape`` (an extra shape in a known colour),
  ``new_color_shape`` (a shape in an extra colour), ``new_color_background`` (an extra colour as background).
  These say *where* an adapter fails: a shape it cannot draw, or a colour the decoder renders badly.

``drawn`` is "drawn right": the right background, and every shape of the right colour and class in the right
place (position for one shape, relation for two); ``all`` also needs the right sizes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdmaker.training._analyser import Analysis, DetectedShape, analyse
from sdmaker.training._captions import caption
from sdmaker.training._scenes import (
    EXTRA_COLORS,
    EXTRA_SHAPES,
    Scene,
    ShapeSpec,
    sample_concept_scene,
    sample_scene,
    scene_rng,
)

__all__ = ["EVAL_SEED", "PROMPT_SETS", "EvalItem", "EvalReport", "concept_kinds", "eval_prompts", "evaluate",
           "score_item", "summarise"]

logger = logging.getLogger(__name__)

EVAL_SEED = 424242
_GROUPS = (("one", 0.3125), ("one_heldout", 0.3125), ("two", 0.25), ("two_heldout", 0.125))
_PARA_GROUPS = (("para_one", 0.625), ("para_two", 0.375))
_CONCEPT_GROUPS = (("concept_one", 0.625), ("concept_two", 0.375))
#: Prompt sets ``sdmaker eval --set`` knows (module docstring).
PROMPT_SETS = ("base", "paraphrase", "concept")
BATCH = 16


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    scene: Scene
    group: str


@dataclass
class EvalReport:
    metrics: dict[str, float]
    groups: dict[str, dict[str, float]]
    n: int
    settings: dict[str, Any]
    seconds: float
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "groups": self.groups, "n": self.n, "settings": self.settings,
                "seconds": round(self.seconds, 2)}


def _counts(n: int, groups: tuple[tuple[str, float], ...]) -> list[int]:
    counts = [max(1, round(n * frac)) for _, frac in groups]
    counts[0] += n - sum(counts)
    return counts


def _extra_prompts(n: int, seed: int, prompt_set: str) -> list[EvalItem]:
    groups = _PARA_GROUPS if prompt_set == "paraphrase" else _CONCEPT_GROUPS
    items: list[EvalItem] = []
    for g, ((group, _), count) in enumerate(zip(groups, _counts(n, groups), strict=True)):
        two = group.endswith("two")
        for i in range(count):
            # seeds of their own: neither the base set's nor training's (seed 0 .. few)
            rng = scene_rng(seed + (50_000 if prompt_set == "paraphrase" else 60_000) + 1000 * g, i)
            if prompt_set == "paraphrase":
                scene = sample_scene(rng, two_shape_prob=1.0 if two else 0.0, heldout="exclude")
                items.append(EvalItem(caption(scene, rng, split="paraphrase"), scene, group))
            else:
                scene = sample_concept_scene(rng, extra_shapes=EXTRA_SHAPES, extra_colors=tuple(EXTRA_COLORS),
                                             two_shape_prob=1.0 if two else 0.0)
                items.append(EvalItem(caption(scene, rng, split="eval"), scene, group))
    return items[:n]


def eval_prompts(n: int = 128, seed: int = EVAL_SEED, prompt_set: str = "base") -> list[EvalItem]:
    """The deterministic held-out prompt set ``prompt_set`` of size ``n`` (groups in the module docstring)."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt set {prompt_set!r} is not one of {', '.join(PROMPT_SETS)}")
    if prompt_set != "base":
        return _extra_prompts(n, seed, prompt_set)
    items: list[EvalItem] = []
    counts = [max(1, round(n * frac)) for _, frac in _GROUPS]
    counts[0] += n - sum(counts)
    for (group, _), count in zip(_GROUPS, counts, strict=True):
        two = group.startswith("two")
        heldout = "only" if group.endswith("heldout") else "exclude"
        for i in range(count):
            rng = scene_rng(seed + 1000 * (1 + [g for g, _ in _GROUPS].index(group)), i)
            scene = sample_scene(rng, two_shape_prob=1.0 if two else 0.0, heldout=heldout)
            items.append(EvalItem(caption(scene, rng, split="eval"), scene, group))
    return items[:n]


def _order(shapes: list[Any], relation: str | None) -> list[Any]:
    horizontal = relation in ("left of", "right of")
    return sorted(shapes, key=lambda s: s.center[0] if horizontal else s.center[1])


def score_item(item: EvalItem, analysis: Analysis) -> dict[str, Any]:
    """Per-attribute correctness of one generated image (1.0 / 0.0, or None when not applicable)."""
    scene = item.scene
    out: dict[str, Any] = {"background": float(analysis.background == scene.background)}
    expected: list[ShapeSpec] = list(scene.shapes)
    detected: list[DetectedShape] = list(analysis.shapes)
    if len(expected) == 1:
        exp = expected[0]
        det = detected[0] if detected else None
        out["count"] = float(len(detected) == 1)
        out["color"] = float(det is not None and det.color == exp.color)
        out["shape"] = float(det is not None and det.shape == exp.shape)
        out["size"] = float(det is not None and det.size == exp.size)
        out["position"] = float(det is not None and det.position == exp.position)
        out["all"] = float(all(out[k] for k in ("background", "color", "shape", "size", "position")))
        out["drawn"] = float(all(out[k] for k in ("background", "color", "shape", "position")))
        return out
    out["count"] = float(len(detected) == 2)
    if len(detected) < 2:
        for key in ("color", "shape", "size", "relation", "two_shape_both", "all", "drawn"):
            out[key] = 0.0
        return out
    exp_sorted, det_sorted = _order(expected, scene.relation), _order(detected[:2], scene.relation)
    colors = [float(d.color == e.color) for d, e in zip(det_sorted, exp_sorted, strict=True)]
    shapes = [float(d.shape == e.shape) for d, e in zip(det_sorted, exp_sorted, strict=True)]
    sizes = [float(d.size == e.size) for d, e in zip(det_sorted, exp_sorted, strict=True)]
    out["color"] = sum(colors) / 2
    out["shape"] = sum(shapes) / 2
    out["size"] = sum(sizes) / 2
    # relation: the detected pair lies along the prompt's axis (ordering then assigns who is where)
    axis_ok = Analysis(analysis.background, det_sorted).relation() in (
        ("left of", "right of") if scene.relation in ("left of", "right of") else ("above", "below"))
    out["relation"] = float(axis_ok)
    out["two_shape_both"] = float(axis_ok and all(colors) and all(shapes))
    out["all"] = float(out["two_shape_both"] and out["background"] and all(sizes))
    out["drawn"] = float(out["two_shape_both"] and out["background"])
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def concept_kinds(scene: Scene) -> list[str]:
    """What ``scene`` asks of the extra words (:data:`EXTRA_SHAPES`, :data:`EXTRA_COLORS`); [] for a base scene."""
    kinds = []
    if any(s.shape in EXTRA_SHAPES and s.color not in EXTRA_COLORS for s in scene.shapes):
        kinds.append("new_shape")
    if any(s.color in EXTRA_COLORS for s in scene.shapes):
        kinds.append("new_color_shape")
    if scene.background in EXTRA_COLORS:
        kinds.append("new_color_background")
    return kinds


def summarise(items: list[EvalItem], scores: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, dict]]:
    """Overall and per-group accuracies. ``overall`` = mean of colour, shape, position, two_shape_both."""
    keys = ("background", "color", "shape", "size", "position", "relation", "two_shape_both", "count", "all", "drawn")
    metrics = {k: v for k in keys if (v := _mean(scores, k)) is not None}
    parts = [metrics.get(k) for k in ("color", "shape", "position", "two_shape_both")]
    metrics["overall"] = sum(p for p in parts if p is not None) / len([p for p in parts if p is not None])
    groups: dict[str, dict[str, float]] = {}
    for name in sorted({it.group for it in items}):
        rows = [s for it, s in zip(items, scores, strict=True) if it.group == name]
        groups[name] = {k: v for k in keys if (v := _mean(rows, k)) is not None}
        groups[name]["n"] = float(len(rows))
    for kind in ("new_shape", "new_color_shape", "new_color_background"):
        rows = [s for it, s in zip(items, scores, strict=True) if kind in concept_kinds(it.scene)]
        if rows:
            groups[kind] = {k: v for k in keys if (v := _mean(rows, k)) is not None}
            groups[kind]["n"] = float(len(rows))
    held = [s for it, s in zip(items, scores, strict=True) if it.group.endswith("heldout")]
    if held:
        groups["heldout_pairs"] = {k: v for k in keys if (v := _mean(held, k)) is not None}
        groups["heldout_pairs"]["n"] = float(len(held))
    return metrics, groups


def evaluate(model: Any, *, n: int = 128, steps: int | None = None, scheduler: str | None = None,
             guidance_scale: float | None = None, deep_cache_interval: int | None = None, seed: int = 0,
             prompt_seed: int = EVAL_SEED, prompt_set: str = "base",
             on_batch: Callable[[int, int], None] | None = None, keep_images: bool = False) -> EvalReport:
    """Generate the prompt set with ``model`` (a LoadedModel) at its defaults unless overridden, and score it.

    ``prompt_seed`` other than :data:`EVAL_SEED` draws a different prompt set (tune settings on that one,
    report on the default one); ``prompt_set`` picks which (:data:`PROMPT_SETS`).
    """
    from sdmaker.engine import generate
    from sdmaker.schema import parse_request

    started = time.perf_counter()
    items = eval_prompts(n, prompt_seed, prompt_set)
    scores: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    resolved_settings: dict[str, Any] = {}
    for start in range(0, len(items), BATCH):
        chunk = items[start:start + BATCH]
        data: dict[str, Any] = {"prompt": [it.prompt for it in chunk], "seed": seed + start, "format": "png"}
        for key, value in (("num_inference_steps", steps), ("scheduler", scheduler),
                           ("guidance_scale", guidance_scale), ("deep_cache_interval", deep_cache_interval)):
            if value is not None:
                data[key] = value
        request = parse_request(data).resolve(model.defaults)
        resolved_settings = {"num_inference_steps": request.num_inference_steps,
                             "guidance_scale": request.guidance_scale,
                             "scheduler": request.scheduler or model.default_scheduler,
                             "deep_cache_interval": request.deep_cache_interval,
                             "height": request.height, "width": request.width, "seed": seed,
                             "prompt_seed": prompt_seed, "prompt_set": prompt_set}
        result = generate(model, request)
        for item, img in zip(chunk, result.images, strict=True):
            analysis = analyse(img.image)
            s = score_item(item, analysis)
            scores.append(s)
            row = {"prompt": item.prompt, "group": item.group, **s}
            if keep_images:
                row["image"] = img.image
            rows.append(row)
        if on_batch is not None:
            on_batch(min(start + BATCH, len(items)), len(items))
    metrics, groups = summarise(items, scores)
    return EvalReport(metrics, groups, len(items), resolved_settings, time.perf_counter() - started, rows)
