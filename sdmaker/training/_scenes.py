"""Synthetic scenes with exact captions: the training and evaluation domain of the built-in model.

A scene is a flat background colour with one or two shapes (circle, square, triangle, star) of a
palette colour, small or large, at one of 9 positions (one shape) or left/right / above/below of each
other (two shapes). Everything is a pure function of an integer seed, so training data is a
deterministic function of ``(seed, step)`` and a resumed run sees exactly the data it would have seen.

Images are drawn at 4x with PIL and downsampled with LANCZOS (anti-aliased edges, exact flat colours
inside shapes), which is also what the analyser expects.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

__all__ = [
    "ALL_COLORS", "ALL_SHAPES", "COLORS", "EXTRA_COLORS", "EXTRA_SHAPES", "HELDOUT_PAIRS", "IMAGE_SIZE", "POSITIONS",
    "random_palette",
    "RELATIONS", "SHAPES", "SIZES", "Scene", "ShapeSpec", "render", "sample_concept_scene", "sample_scene", "scene_rng",
    "shape_points",
]

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

#: The palette, exact RGB values (issue 4).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
#: Concepts the built-in model never saw (issue 16): a LoRA adapter teaches them. Opt-in only: the base
#: model's data and eval draw from COLORS/SHAPES alone; a config names them in ``data.extra_shapes`` /
#: ``data.extra_colors``. The analyser knows them all, so the judge can tell a heart or pink when it sees one.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"pink": (250, 120, 200)}
EXTRA_SHAPES = ("heart",)
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}
ALL_SHAPES = SHAPES + EXTRA_SHAPES
#: Radius of the circumscribed circle in pixels of the 64x64 image.
SIZES: dict[str, float] = {"small": 7.0, "large": 12.0}
#: Anchor (x, y) of one shape at each named position.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (32, 32), "left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48),
    "top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
}
#: Two-shape relations: the first shape's position relative to the second one.
RELATIONS = ("left of", "right of", "above", "below")
_REL_ANCHORS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left of": ((16, 32), (48, 32)),
    "right of": ((48, 32), (16, 32)),
    "above": ((32, 16), (32, 48)),
    "below": ((32, 48), (32, 16)),
}
#: (colour, shape) pairs never drawn in training scenes; evaluation prompts use them separately to
#: measure composition (each colour and each shape still appears in training with other partners).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("blue", "triangle"), ("yellow", "square"), ("purple", "circle"),
})


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: palette colour, class, size name and anchor in 64x64 pixel coordinates."""

    color: str
    shape: str
    size: str
    center: tuple[float, float]
    position: str | None = None  # named position (one-shape scenes)


@dataclass(frozen=True)
class Scene:
    """A background colour plus one or two shapes; ``relation`` relates shapes[0] to shapes[1]."""

    background: str
    shapes: tuple[ShapeSpec, ...]
    relation: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False)


def scene_rng(seed: int, index: int) -> random.Random:
    """The RNG of sample ``index`` of a dataset with ``seed`` (independent of any other sample)."""
    return random.Random((seed * 1_000_003 + index) * 2_654_435_761 % (2**63))


def _pick_color(rng: random.Random, exclude: set[str]) -> str:
    return rng.choice([c for c in COLORS if c not in exclude])


def _pick_pair(rng: random.Random, background: str, heldout: str) -> tuple[str, str]:
    """A (colour, shape) pair; ``heldout`` = 'exclude' (training), 'only' (eval) or 'any'."""
    while True:
        color, shape = _pick_color(rng, {background}), rng.choice(SHAPES)
        is_held = (color, shape) in HELDOUT_PAIRS
        if heldout == "any" or (heldout == "exclude" and not is_held) or (heldout == "only" and is_held):
            return color, shape


def sample_scene(rng: random.Random, *, two_shape_prob: float = 0.35, heldout: str = "exclude",
                 jitter: float = 1.0) -> Scene:
    """Draw a random scene. ``jitter`` (pixels) moves anchors a little so edges are not pixel-locked."""
    background = rng.choice(list(COLORS))

    def _jit(xy: tuple[float, float]) -> tuple[float, float]:
        return (xy[0] + rng.uniform(-jitter, jitter), xy[1] + rng.uniform(-jitter, jitter))

    if rng.random() < two_shape_prob:
        relation = rng.choice(RELATIONS)
        first_anchor, second_anchor = _REL_ANCHORS[relation]
        specs = []
        for anchor in (first_anchor, second_anchor):
            color, shape = _pick_pair(rng, background, "any" if heldout == "only" else heldout)
            specs.append(ShapeSpec(color, shape, rng.choice(list(SIZES)), _jit(anchor)))
        if heldout == "only" and not any((s.color, s.shape) in HELDOUT_PAIRS for s in specs):
            color, shape = _pick_pair(rng, background, "only")
            specs[0] = ShapeSpec(color, shape, specs[0].size, specs[0].center)
        return Scene(background, tuple(specs), relation)
    color, shape = _pick_pair(rng, background, heldout)
    position = rng.choice(list(POSITIONS))
    spec = ShapeSpec(color, shape, rng.choice(list(SIZES)), _jit(POSITIONS[position]), position)
    return Scene(background, (spec,))


def sample_concept_scene(rng: random.Random, *, extra_shapes: tuple[str, ...] = (), extra_colors: tuple[str, ...] = (),
                         two_shape_prob: float = 0.35, jitter: float = 1.0) -> Scene:
    """A scene that features an extra shape or colour (a concept scene): on a shape, or as the background.

    Backgrounds and partners come from the base palette and shapes plus the extras, so the new words are
    seen in every role and beside every old one. Held-out pairs of the base domain stay held out.
    """
    for name in extra_shapes:
        if name not in EXTRA_SHAPES:
            raise ValueError(f"unknown extra shape {name!r} (known: {', '.join(EXTRA_SHAPES)})")
    for name in extra_colors:
        if name not in EXTRA_COLORS:
            raise ValueError(f"unknown extra colour {name!r} (known: {', '.join(EXTRA_COLORS)})")
    if not extra_shapes and not extra_colors:
        raise ValueError("a concept scene needs at least one extra shape or colour")
    colors, shapes = [*COLORS, *extra_colors], [*SHAPES, *extra_shapes]
    background = rng.choice(colors)

    def _jit(xy: tuple[float, float]) -> tuple[float, float]:
        return (xy[0] + rng.uniform(-jitter, jitter), xy[1] + rng.uniform(-jitter, jitter))

    def _pair() -> tuple[str, str]:
        while True:
            color, shape = rng.choice([c for c in colors if c != background]), rng.choice(shapes)
            if (color, shape) not in HELDOUT_PAIRS:
                return color, shape

    two = rng.random() < two_shape_prob
    pairs = [_pair() for _ in range(2 if two else 1)]
    k = rng.randrange(len(pairs))
    if not any(c in extra_colors or s in extra_shapes for c, s in pairs):  # make shape k a concept one (where it
        # can: with the only extra colour as the background and colour mode, the background is the concept)
        color, shape = pairs[k]
        modes = (["shape"] if extra_shapes else []) + (["color"] if extra_colors else []) + (
            ["both"] if extra_shapes and extra_colors else [])
        mode = rng.choice(modes)
        if mode in ("shape", "both"):
            shape = rng.choice(extra_shapes)
        if mode in ("color", "both"):
            options = [c for c in extra_colors if c != background]
            color = rng.choice(options) if options else color
            if color not in extra_colors and not extra_shapes:
                background = rng.choice(list(COLORS))  # the only extra colour was the background
                color = rng.choice(extra_colors)
                pairs = [(c if c != background else color, s) for c, s in pairs]
        pairs[k] = (color, shape)
    if two:
        relation = rng.choice(RELATIONS)
        anchors = _REL_ANCHORS[relation]
        specs = tuple(ShapeSpec(c, s, rng.choice(list(SIZES)), _jit(a)) for (c, s), a in zip(pairs, anchors,
                                                                                              strict=True))
        return Scene(background, specs, relation)
    position = rng.choice(list(POSITIONS))
    color, shape = pairs[0]
    return Scene(background, (ShapeSpec(color, shape, rng.choice(list(SIZES)), _jit(POSITIONS[position]), position),))


def _heart(cx: float, cy: float, r: float, n: int = 48) -> list[tuple[float, float]]:
    """The classic parametric heart, ``r`` wide either side, centred on its bounding box."""
    raw = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        raw.append((x, y))
    ys = [y for _, y in raw]
    mid = (max(ys) + min(ys)) / 2
    return [(cx + x * r / 16, cy + (y - mid) * r / 16) for x, y in raw]


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of ``shape`` (None for a circle), in the same units as the centre and radius."""
    if shape == "square":
        h = r * 0.8
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Upward equilateral triangle, vertically centred on its bounding box (not its circumcentre).
        half_w, height = r, r * math.sqrt(3)
        return [(cx, cy - height / 2), (cx + half_w, cy + height / 2), (cx - half_w, cy + height / 2)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang) + r * 0.095))
        return pts
    if shape == "heart":
        return _heart(cx, cy, r)
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, spec: ShapeSpec, fill: tuple[int, ...] | int, scale: float) -> None:
    cx, cy = spec.center[0] * scale, spec.center[1] * scale
    r = SIZES[spec.size] * scale
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        points = shape_points(spec.shape, cx, cy, r)
        assert points is not None  # only circles have no polygon
        draw.polygon(points, fill=fill)


def random_palette(scene: Scene, rng: random.Random, min_distance: float = 80.0) -> dict[str, tuple[int, int, int]]:
    """Uniformly random RGB values for the colours ``scene`` uses, each ``min_distance`` from the others.

    A VAE trained only on the named palette maps colours it never saw onto its nearest palette latent (pink
    decodes as white), so no adapter could ever teach it a new colour; recoloured scenes make it a
    general-colour autoencoder, as an image VAE should be.
    """
    names = list(dict.fromkeys([scene.background, *(s.color for s in scene.shapes)]))
    out: dict[str, tuple[int, int, int]] = {}
    for name in names:
        for _ in range(100):
            rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            if all(sum((a - b) ** 2 for a, b in zip(rgb, other, strict=True)) ** 0.5 >= min_distance
                   for other in out.values()):
                break
        out[name] = rgb
    return out


def render(scene: Scene, size: int = IMAGE_SIZE, palette: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """Anti-aliased RGB rendering of ``scene`` at ``size`` x ``size`` (anchors are in 64x64 units).

    ``palette`` overrides the RGB value of colour names (a recoloured scene, :func:`random_palette`).
    """
    colors = {**ALL_COLORS, **(palette or {})}
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), colors[scene.background])
    draw = ImageDraw.Draw(img)
    for spec in scene.shapes:
        _draw(draw, spec, colors[spec.color], big / IMAGE_SIZE)
    return img.resize((size, size), Image.Resampling.LANCZOS)
