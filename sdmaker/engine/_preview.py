"""Progress reports and preview images of a running generation.

Every denoising step reports a :class:`StepProgress`: step ``i`` of ``n``, the time since the job's
first step, an ETA, and, when the request asks for it (``preview``), one preview image per output image.

Two kinds of preview:

* ``approx``: a linear latent-to-RGB map (a ``channels x 3`` matrix plus a bias) applied to each latent
  pixel, then upsampled to the image size. It costs a tiny matmul and a resize, next to nothing beside
  a UNet call. The factors are the model's own: :func:`fit_latent_preview` fits them by least squares
  against the model's VAE (its decoder's output, average-pooled to latent resolution), on latents the
  VAE's own encoder made from synthetic images (smooth colour fields and solid shapes). They are kept
  with the model: in ``sdmaker.json`` under ``"latent_preview"`` (the built-in ``mini`` ships them so),
  or in the file :func:`~sdmaker.files.preview_factors_path` names beside the model folder (the store
  writes one for each imported model). A model with neither is fitted once, the first time a request
  asks for an approx preview, and the factors are kept on the loaded model.
* ``vae``: a full VAE decode of the current latents, every ``preview_every`` steps (default: about four
  per run). It costs one decode each time.

Previews only read the latents (and never a random generator), so the images a request returns are
bit-identical with previews on or off, with step batching and DeepCache alike.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdmaker.errors import ModelFormatError
from sdmaker.files import MODEL_CARD_FILE, atomic_write_json, preview_factors_path

__all__ = ["PREVIEW_KEY", "LatentPreview", "ProgressCallback", "StepProgress", "fit_latent_preview",
           "fit_preview_file", "preview_interval", "read_latent_preview"]

logger = logging.getLogger(__name__)

#: Key of the factors in ``sdmaker.json`` and the whole content of the file beside a model.
PREVIEW_KEY = "latent_preview"
#: VAE previews per run when ``preview_every`` is 0 (auto).
_VAE_PREVIEWS_PER_RUN = 4


@dataclass
class StepProgress:
    """One step's progress report for one request.

    ``previews`` (uint8 arrays, HWC RGB, one per output image, in output order) is set on the steps the
    request asked a preview for, ``None`` otherwise; ``preview_kind`` says how it was made.
    """

    step: int
    total: int
    elapsed_s: float
    eta_s: float | None
    previews: list[np.ndarray] | None = None
    preview_kind: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """The ``step`` event's data (previews travel separately)."""
        return {"step": self.step, "total": self.total, "elapsed_s": round(self.elapsed_s, 4),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 4)}


#: ``on_progress(progress)`` is called after each denoising step, from the thread that runs the step.
ProgressCallback = Callable[[StepProgress], None]


def preview_interval(kind: str, every: int, total: int) -> int:
    """Steps between previews: ``every`` when set, else every step (approx) or about four per run (vae)."""
    if kind == "none":
        return 0
    if every > 0:
        return every
    return 1 if kind == "approx" else max(1, math.ceil(total / _VAE_PREVIEWS_PER_RUN))


@dataclass(frozen=True, eq=False)
class LatentPreview:
    """A linear latent-to-RGB map: ``rgb = latents @ matrix + bias`` per latent pixel, RGB in [0, 1].

    ``matrix`` is ``(channels, 3)`` and applies to the latents as the loop holds them (scaled by the VAE's
    ``scaling_factor``).
    """

    matrix: np.ndarray
    bias: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "matrix": [[round(float(v), 6) for v in row] for row in self.matrix],
                "bias": [round(float(v), 6) for v in self.bias]}

    @classmethod
    def from_json(cls, data: Any, *, where: str = "latent_preview") -> LatentPreview:
        """Factors from their JSON form; :class:`ModelFormatError` naming ``where`` when malformed."""
        try:
            matrix = np.asarray(data["matrix"], dtype=np.float32)
            bias = np.asarray(data["bias"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{where}: latent preview factors must be {{'matrix': [[...] x channels], "
                                   f"'bias': [r, g, b]}} ({exc})", model=where) from exc
        if matrix.ndim != 2 or matrix.shape[1] != 3 or bias.shape != (3,) or not np.isfinite(matrix).all():
            raise ModelFormatError(f"{where}: latent preview matrix must be channels x 3 and bias 3 finite numbers, "
                                   f"got {matrix.shape} and {bias.shape}", model=where)
        return cls(matrix=matrix, bias=bias)

    def rgb(self, latents: torch.Tensor, size: tuple[int, int]) -> list[np.ndarray]:
        """One uint8 HWC image per latent, upsampled (bilinear) to ``size`` = (height, width)."""
        if latents.shape[1] != self.matrix.shape[0]:
            raise ModelFormatError(f"latent preview factors are for {self.matrix.shape[0]} latent channels, the "
                                   f"model has {latents.shape[1]}", model="latent_preview")
        with torch.inference_mode():
            lat = latents.detach().to("cpu", torch.float32)
            m = torch.from_numpy(self.matrix)
            b = torch.from_numpy(self.bias).view(1, 3, 1, 1)
            img = torch.einsum("nchw,ck->nkhw", lat, m) + b
            img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False)
            img = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return list(img.numpy())


def read_latent_preview(model_dir: Path) -> LatentPreview | None:
    """The factors kept with the model at ``model_dir`` (``sdmaker.json``, then the file beside it), or None."""
    card = model_dir / MODEL_CARD_FILE
    if card.is_file():
        try:
            data = json.loads(card.read_text())
        except (OSError, ValueError):
            data = None  # the loader reports a broken card
        if isinstance(data, dict) and PREVIEW_KEY in data:
            return LatentPreview.from_json(data[PREVIEW_KEY], where=str(card))
    side = preview_factors_path(model_dir)
    if side.is_file():
        try:
            return LatentPreview.from_json(json.loads(side.read_text()), where=str(side))
        except (OSError, ValueError, ModelFormatError) as exc:
            logger.warning("ignoring latent preview factors %s: %s (they will be fitted again)", side, exc)
    return None


def _synthetic_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` RGB images in [-1, 1]: smooth random colour fields with solid rectangles and discs on them."""
    g = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(count):
        for _ in range(4):
            colour = torch.rand(3, 1, 1, generator=g)
            cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 3])).tolist()
            if torch.rand(1, generator=g).item() < 0.5:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (r + 2) ** 2
            else:
                mask = ((xx - cx).abs() <= r + 2) & ((yy - cy).abs() <= r / 2 + 2)
            images[i] = torch.where(mask, colour, images[i])
    return images.clamp(0, 1) * 2 - 1


def fit_latent_preview(vae: Any, *, count: int = 8, latent_size: int = 16, seed: int = 0) -> LatentPreview:
    """Fit a :class:`LatentPreview` to ``vae`` (a diffusers ``AutoencoderKL``) by least squares.

    Latents come from the VAE's encoder (posterior mean, times ``scaling_factor``) on synthetic images
    of ``latent_size`` latent pixels square; the target is the VAE's decode of those latents, average-pooled
    to latent resolution, in [0, 1]. A few small encodes and decodes: well under a second for SD's VAE on a CPU.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    scaling = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    param = next(vae.parameters())
    images = _synthetic_images(count, latent_size * factor, seed).to(param.device, param.dtype)
    with torch.inference_mode():
        latents = vae.encode(images).latent_dist.mean
        decoded = vae.decode(latents, return_dict=False)[0].float()
        scaled = ((latents.float() - shift) * scaling).cpu()
        target = (decoded.clamp(-1, 1) / 2 + 0.5)
        target = torch.nn.functional.avg_pool2d(target, factor).cpu()
    channels = scaled.shape[1]
    x = scaled.permute(0, 2, 3, 1).reshape(-1, channels).double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(x, y).solution.float().numpy()
    return LatentPreview(matrix=solution[:channels], bias=solution[channels])


def fit_preview_file(model_dir: Path, *, device: str = "cpu") -> Path:
    """Fit the factors of the model at ``model_dir`` (its VAE only is loaded) and write them beside it.

    Written atomically to :func:`~sdmaker.files.preview_factors_path`; returns that path. Called when a
    model is imported into the store, so its workers find the factors instead of fitting them.
    """
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).to(device)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot load the VAE of {model_dir} to fit preview factors: {exc}",
                               model=str(model_dir)) from exc
    factors = fit_latent_preview(vae)
    path = preview_factors_path(model_dir)
    atomic_write_json(path, factors.to_json())
    return path
