"""The tuner's quality metric: how far a candidate's images are from the reference recipe's images.

SSIM (structural similarity, Wang et al. 2004; Gaussian window 11, sigma 1.5, constants K1=0.01,
K2=0.03 on a [0, 1] range) per RGB channel, averaged over the image; the distance is ``1 - SSIM``.
Reference-based on purpose: the tuner has no judge for a user's model, only the model's own slow recipe,
and the images of the same seed and prompt under that recipe are what the user would otherwise get.

Why SSIM and not pixel error: a recipe that shifts a shape by a pixel or softens an edge keeps the
picture, a recipe that loses a shape or changes its colour does not; SSIM's structure term separates
these better than mean squared error at 64x64, and needs no learned network (the calibration in
``bench/tune.py`` maps it onto the ``sdmaker eval`` judge on ``mini``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["METRIC_NAME", "image_distances"]

METRIC_NAME = "1-SSIM"

_WINDOW = 11
_SIGMA = 1.5
_C1 = 0.01**2
_C2 = 0.03**2


def _kernel(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def image_distances(candidate: np.ndarray, reference: np.ndarray) -> list[float]:
    """``1 - SSIM`` of each image pair; arrays are NHWC floats in [0, 1] (``GenerationResult.arrays``).

    Images smaller than the window use a window of their own size, so any size the schema allows works.
    """
    if candidate.shape != reference.shape:
        raise ValueError(f"image shapes differ: {candidate.shape} vs {reference.shape}")
    a = torch.from_numpy(np.ascontiguousarray(candidate, dtype=np.float64)).permute(0, 3, 1, 2)
    b = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64)).permute(0, 3, 1, 2)
    n, c, h, w = a.shape
    size = min(_WINDOW, h, w)
    kernel = _kernel(size, _SIGMA).expand(c, 1, size, size).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + _C1) * (2 * cov + _C2)) / ((mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2))
    per_image = ssim.mean(dim=(1, 2, 3))
    return [float(1.0 - s) for s in per_image.clamp(-1.0, 1.0)]
