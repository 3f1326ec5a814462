"""Captions of synthetic scenes: many templates and word orders, some held out for evaluation.

The model must learn the words (colour, shape, size, position, relation), not one sentence pattern,
so each training caption picks a random template, a random phrasing of the position, and for two
shapes randomly states the relation from either side ("A left of B" == "B right of A").
"""

from __future__ import annotations

import random
import re

from sdmaker.training._scenes import Scene, ShapeSpec

__all__ = ["EVAL_TEMPLATES", "TRAIN_TEMPLATES", "caption"]

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle", "at the center"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "top left": ("in the top left corner", "at the top left", "in the top left"),
    "top right": ("in the top right corner", "at the top right", "in the top right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the bottom left"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the bottom right"),
}
_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

#: One-shape templates: {obj} = "a large red circle" / "large red circle", {pos}, {bg}.
_ONE_TRAIN = (
    "a {obj} {pos} on a {bg} background",
    "{bg} background, {obj} {pos}",
    "a {obj} on a {bg} background, {pos}",
    "{pos}, a {obj}, {bg} background",
    "a {bg} background with a {obj} {pos}",
    "{obj} {pos}, {bg} background",
    "a {obj} {pos}, {bg} background",
    "on a {bg} background, a {obj} {pos}",
)
_ONE_EVAL = (
    "{pos} a {obj} on a {bg} background",
    "{bg} background with a {obj} {pos}",
)
#: Two-shape templates: {a} {rel} {b}, {bg}.
_TWO_TRAIN = (
    "a {a} {rel} a {b}, {bg} background",
    "a {a} {rel} a {b} on a {bg} background",
    "{bg} background, a {a} {rel} a {b}",
    "on a {bg} background, a {a} {rel} a {b}",
    "{a} {rel} {b}, {bg} background",
)
_TWO_EVAL = (
    "a {bg} background with a {a} {rel} a {b}",
)
TRAIN_TEMPLATES = {"one": _ONE_TRAIN, "two": _TWO_TRAIN}
#: Held-out templates (never used in training captions): word orders the model has not seen.
EVAL_TEMPLATES = {"one": _ONE_EVAL, "two": _TWO_EVAL}


def _obj(spec: ShapeSpec) -> str:
    return f"{spec.size} {spec.color} {spec.shape}"


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=orange\b)", "an ", text)


def caption(scene: Scene, rng: random.Random, *, split: str = "train") -> str:
    """A caption of ``scene``; ``split`` = 'train' or 'eval' picks the template family."""
    templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
    if len(scene.shapes) == 1:
        spec = scene.shapes[0]
        assert spec.position is not None
        template = rng.choice(templates["one"])
        return _articles(template.format(obj=_obj(spec), pos=rng.choice(_POSITION_PHRASES[spec.position]),
                                         bg=scene.background))
    assert scene.relation is not None
    first, second = scene.shapes
    relation = scene.relation
    if rng.random() < 0.5:  # state it from the other side
        first, second, relation = second, first, _INVERSE[relation]
    template = rng.choice(templates["two"])
    return _articles(template.format(a=_obj(first), b=_obj(second), rel=rng.choice(_RELATION_PHRASES[relation]),
                                     bg=scene.background))
