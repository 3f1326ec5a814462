"""The scene generator: deterministic, exact palette colours, held-out pairs and templates respected."""

from __future__ import annotations

import numpy as np

from sdmaker.training import (
    COLORS,
    EVAL_TEMPLATES,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    TRAIN_TEMPLATES,
    caption,
    render,
    sample_scene,
    scene_rng,
)


def test_same_seed_same_scene_caption_and_pixels() -> None:
    for i in range(20):
        a_rng, b_rng = scene_rng(3, i), scene_rng(3, i)
        a, b = sample_scene(a_rng), sample_scene(b_rng)
        assert a == b
        assert caption(a, a_rng) == caption(b, b_rng)
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert sample_scene(scene_rng(3, 0)) != sample_scene(scene_rng(4, 0)) or \
        sample_scene(scene_rng(3, 1)) != sample_scene(scene_rng(4, 1))


def test_exact_colours_and_antialiased_edges() -> None:
    for i in range(30):
        scene = sample_scene(scene_rng(1, i))
        arr = np.asarray(render(scene))
        assert arr.shape == (64, 64, 3)
        assert tuple(arr[0, 0]) == COLORS[scene.background]
        for spec in scene.shapes:
            assert spec.color != scene.background
            x, y = (round(v) for v in spec.center)
            if spec.shape != "star":  # a star's centre pixel is inside it too, but keep the check simple
                assert tuple(arr[y, x]) == COLORS[spec.color]
        # anti-aliasing: some pixels are neither the background nor a shape colour
        palette = {COLORS[scene.background], *(COLORS[s.color] for s in scene.shapes)}
        mixed = sum(1 for px in arr.reshape(-1, 3) if tuple(px) not in palette)
        assert mixed > 0


def test_heldout_pairs_never_in_training_scenes_and_all_words_covered() -> None:
    seen_colors, seen_shapes, seen_positions = set(), set(), set()
    for i in range(1500):
        scene = sample_scene(scene_rng(0, i), heldout="exclude")
        for spec in scene.shapes:
            assert (spec.color, spec.shape) not in HELDOUT_PAIRS
            seen_colors.add(spec.color)
            seen_shapes.add(spec.shape)
            if spec.position:
                seen_positions.add(spec.position)
    assert seen_colors == set(COLORS) and seen_shapes == set(SHAPES) and seen_positions == set(POSITIONS)
    only = [sample_scene(scene_rng(9, i), heldout="only", two_shape_prob=0.5) for i in range(50)]
    assert all(any((s.color, s.shape) in HELDOUT_PAIRS for s in sc.shapes) for sc in only)


def test_caption_templates_are_disjoint_and_name_every_attribute() -> None:
    assert not set(TRAIN_TEMPLATES["one"]) & set(EVAL_TEMPLATES["one"])
    assert not set(TRAIN_TEMPLATES["two"]) & set(EVAL_TEMPLATES["two"])
    texts = set()
    for i in range(200):
        rng = scene_rng(2, i)
        scene = sample_scene(rng)
        text = caption(scene, rng)
        texts.add(text.split(",")[0][:12])
        assert scene.background in text
        for spec in scene.shapes:
            assert spec.color in text and spec.shape in text and spec.size in text
    assert len(texts) > 20  # many word orders, not one template
