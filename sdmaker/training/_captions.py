"""Captions of synthetic scenes: many templates and word orders, some held out for evaluation.

The model must learn the words (colour, shape, size, position, relation), not one sentence pattern,
so each training caption picks a random template, a random phrasing of the position, and for two
shapes randomly states the relation from either side ("A left of B" == "B right of A").
"""

from __future__ import annotations

import random
import re

from sdmaker.training._scenes import Scene, ShapeSpec

__all__ = ["CAPTION_STYLES", "EVAL_TEMPLATES", "PARAPHRASE_TEMPLATES", "TRAIN_TEMPLATES", "WIDE_TEMPLATES", "caption"]

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


# --- paraphrases (issue 16) -------------------------------------------------------------------------------
# The paraphrase eval set (``split="paraphrase"``) uses sentence shapes and phrasings that no training caption
# contains, in either caption style. What is held out: the templates below (PARAPHRASE_TEMPLATES) and the exact
# position/relation phrases of _PARA_POSITION/_PARA_RELATION. What is shared with the "wide" training style:
# the vocabulary ("big", "tiny", "little", "upper", "lower", "toward", "edge", "backdrop", "against", "plain",
# "there is", "draw", "image", "shape", "sits", "higher", "lower", "down", "up", "further"...), in other combinations, so
# that understanding a paraphrase means composing known words, not guessing new ones.

#: Size words: the base style says only large/small; the wide style and the paraphrase set use all.
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"large": ("large", "big", "huge"), "small": ("small", "tiny", "little")}
#: Extra position phrases of the wide training style (added to _POSITION_PHRASES).
_WIDE_POSITION: dict[str, tuple[str, ...]] = {
    "center": ("in the centre", "in the middle of the image", "centered"),
    "left": ("toward the left", "on the left edge", "on the left-hand side"),
    "right": ("toward the right", "on the right edge", "on the right-hand side"),
    "top": ("toward the top", "up top", "on the top edge", "at the top of the image"),
    "bottom": ("toward the bottom", "on the bottom edge", "at the bottom of the image"),
    "top left": ("at the upper left", "at the upper left corner", "up in the corner at the top left"),
    "top right": ("at the upper right", "at the upper right corner", "up in the corner at the top right"),
    "bottom left": ("at the lower left", "at the lower left corner", "down in the corner at the bottom left"),
    "bottom right": ("at the lower right", "at the lower right corner", "down in the corner at the bottom right"),
}
#: Held-out position phrases (paraphrase eval only).
_PARA_POSITION: dict[str, tuple[str, ...]] = {
    "center": ("right in the middle", "in the centre of the image"),
    "left": ("toward the left edge", "on the left-hand edge"),
    "right": ("toward the right edge", "on the right-hand edge"),
    "top": ("up at the top", "toward the top edge"),
    "bottom": ("down at the bottom", "toward the bottom edge"),
    "top left": ("in the upper left", "up in the top left"),
    "top right": ("in the upper right", "up in the top right"),
    "bottom left": ("in the lower left", "down in the bottom left"),
    "bottom right": ("in the lower right", "down in the bottom right"),
}
_WIDE_RELATION: dict[str, tuple[str, ...]] = {
    "left of": ("on the left side of", "further to the left of"),
    "right of": ("on the right side of", "further to the right of"),
    "above": ("higher than", "up above"),
    "below": ("lower than", "beneath", "down below"),
}
_PARA_RELATION: dict[str, tuple[str, ...]] = {
    "left of": ("on the left of", "further left than"),
    "right of": ("on the right of", "further right than"),
    "above": ("higher up than",),
    "below": ("lower down than",),
}
_ONE_WIDE = (
    "a {obj} {pos}, {bg} backdrop",
    "on a {bg} backdrop, a {obj} {pos}",
    "there is a {obj} {pos}, {bg} background",
    "draw a {obj} {pos}, {bg} background",
    "a picture of a {obj} {pos} on a {bg} background",
    "{obj} shape {pos}, {bg} background",
    "a plain {bg} background with a {obj} {pos}",
    "against a {bg} background, a {obj} {pos}",
    "the background is {bg}, a {obj} {pos}",
    "a {obj} sits {pos}, {bg} background",
    "an image with a {obj} {pos} on a {bg} background",
)
_TWO_WIDE = (
    "there is a {a} {rel} a {b}, {bg} background",
    "draw a {a} {rel} a {b}, {bg} backdrop",
    "a picture of a {a} {rel} a {b} on a {bg} background",
    "against a {bg} background, a {a} {rel} a {b}",
    "the background is {bg}, a {a} shape {rel} a {b} shape",
)
#: Held-out paraphrase templates (never in training captions of either style).
_ONE_PARA = (
    "there is a {obj} {pos} against a {bg} backdrop",
    "draw a {obj} {pos} on a plain {bg} background",
    "an image of a {obj} shape {pos}, the background is {bg}",
    "{bg} backdrop; {pos} sits a {obj}",
)
_TWO_PARA = (
    "there is a {a} {rel} a {b} against a {bg} backdrop",
    "draw a {a} {rel} a {b} on a plain {bg} background",
    "an image of a {a} shape {rel} a {b} shape, the background is {bg}",
)
WIDE_TEMPLATES = {"one": _ONE_TRAIN + _ONE_WIDE, "two": _TWO_TRAIN + _TWO_WIDE}
PARAPHRASE_TEMPLATES = {"one": _ONE_PARA, "two": _TWO_PARA}
#: Caption styles of training data: "base" (the original recipe's) and "wide" (+ synonyms and templates).
CAPTION_STYLES = ("base", "wide")


def _obj(spec: ShapeSpec, rng: random.Random | None = None) -> str:
    size = spec.size if rng is None else rng.choice(_SIZE_WORDS[spec.size])
    return f"{size} {spec.color} {spec.shape}"


def _phrases(split: str, style: str) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    if split == "paraphrase":
        return _PARA_POSITION, _PARA_RELATION
    if style == "wide":
        return ({k: v + _WIDE_POSITION[k] for k, v in _POSITION_PHRASES.items()},
                {k: v + _WIDE_RELATION[k] for k, v in _RELATION_PHRASES.items()})
    return _POSITION_PHRASES, _RELATION_PHRASES


def _articles(text: str) -> str:
    text = re.sub(r"\ba (?=orange\b)", "an ", text)
    return re.sub(r"\bA (?=orange\b)", "An ", text)


def caption(scene: Scene, rng: random.Random, *, split: str = "train", style: str = "base") -> str:
    """A caption of ``scene``.

    ``split`` = 'train', 'eval' (held-out templates) or 'paraphrase' (held-out templates and phrases);
    ``style`` = 'base' (the original recipe's captions, the default) or 'wide' (training only: synonyms of
    sizes, positions, relations and backgrounds, and more sentence shapes).
    """
    wide = split == "paraphrase" or (split == "train" and style == "wide")
    if split == "paraphrase":
        templates = PARAPHRASE_TEMPLATES
    elif split == "train":
        templates = WIDE_TEMPLATES if style == "wide" else TRAIN_TEMPLATES
    else:
        templates = EVAL_TEMPLATES
    positions, relations = _phrases(split, style)
    if len(scene.shapes) == 1:
        spec = scene.shapes[0]
        assert spec.position is not None
        template = rng.choice(templates["one"])
        return _articles(template.format(obj=_obj(spec, rng if wide else None),
                                         pos=rng.choice(positions[spec.position]), bg=scene.background))
    assert scene.relation is not None
    first, second = scene.shapes
    relation = scene.relation
    if rng.random() < 0.5:  # state it from the other side
        first, second, relation = second, first, _INVERSE[relation]
    template = rng.choice(templates["two"])
    return _articles(template.format(a=_obj(first, rng if wide else None), b=_obj(second, rng if wide else None),
                                     rel=rng.choice(relations[relation]), bg=scene.background))
