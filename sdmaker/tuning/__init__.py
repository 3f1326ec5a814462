"""``sdmaker model tune``: measure recipes on a model and keep the fastest one that keeps its pictures.

The search (:func:`tune`) and its quality metric (:func:`image_distances`, ``1 - SSIM`` against the
model's own reference recipe) live here; the store writes the result into the model's ``sdmaker.json``
(:meth:`sdmaker.store.Store.set_tuned`), which is where every loader reads a model's defaults from.
"""

from sdmaker.tuning._metric import METRIC_NAME, image_distances
from sdmaker.tuning._search import (
    DEFAULT_PROMPTS,
    QUALITY_THRESHOLD,
    REFERENCE_STEPS,
    STEP_LADDER,
    Candidate,
    Recipe,
    TuneResult,
    tune,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "METRIC_NAME",
    "QUALITY_THRESHOLD",
    "REFERENCE_STEPS",
    "STEP_LADDER",
    "Candidate",
    "Recipe",
    "TuneResult",
    "image_distances",
    "tune",
]
