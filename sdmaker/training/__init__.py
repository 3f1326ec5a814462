"""sdmaker's own training pipeline and the synthetic scene domain of the built-in model ``mini``.

Scenes and captions (:mod:`._scenes`, :mod:`._captions`), their pixel analyser (:mod:`._analyser`),
on-the-fly datasets, the VAE/UNet trainer with exact resume and MLflow tracking, and evaluation.
Importing this package does not import torch; the trainer modules do.
"""

from sdmaker.training._captions import EVAL_TEMPLATES, TRAIN_TEMPLATES, caption
from sdmaker.training._config import load_config
from sdmaker.training._scenes import (
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeSpec,
    render,
    sample_scene,
    scene_rng,
)

__all__ = [
    "COLORS", "EVAL_TEMPLATES", "HELDOUT_PAIRS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "TRAIN_TEMPLATES",
    "Scene", "ShapeSpec", "caption", "load_config", "render", "sample_scene", "scene_rng",
]
