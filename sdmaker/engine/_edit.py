"""Image-to-image and inpainting in sdmaker's one loop, on the loaded components (no second copy of weights).

A request with ``image`` (and ``mask_image``) becomes an ordinary :class:`~sdmaker.engine._loop.Job` whose
start latents come from the input image and whose timesteps start later; what differs per step lives in
its :class:`Edit` (extra UNet input channels, the mask blend after each ``scheduler.step``, the paste-back
after decoding). So txt2img, img2img and inpainting jobs share UNet calls under step batching.

The operations are diffusers' ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline``'s,
in their order, so a one-image job matches them (fp32, <= 1e-4; tests keep them as the reference):

* ``strength`` picks the start as ``get_timesteps`` does: ``int(steps x strength)`` steps actually run
  (times the sampler's order), from timestep index ``steps - int(steps x strength)``.
* img2img: the image is VAE-encoded with a sample of its latent distribution drawn from the image's own
  generator, then noised to the start timestep with noise from the same generator.
* inpainting, 4-channel UNets (``mini``): after every step the latents outside the mask are replaced by
  the image's latents noised to the next timestep (the clean latents after the last one). 9-channel
  inpainting UNets get the mask and the masked image's latents as extra input channels instead.
* inpainting pastes the input's pixels back outside the (binarized) mask after decoding, the diffusers
  ``apply_overlay`` convention, so unmasked pixels come back exactly (not through a VAE round trip).

One difference, on purpose: diffusers' inpaint pipeline encodes the image once with the first generator
and repeats it for every image; here each image encodes with its own generator (as its img2img pipeline
does), so image ``i`` still regenerates alone from its own seed. A one-image request is identical.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdmaker.errors import InvalidRequestError
from sdmaker.schema import ResolvedRequest, decode_input_image

__all__ = ["Edit", "load_input_image", "prepare_edit", "start_timesteps"]


def load_input_image(value: str, field: str, mode: str = "RGB") -> Any:
    """The PIL image of a base64 input field, fully decoded (a truncated file is a 400 naming ``field``)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(decode_input_image(value, field))) as img:
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"{field} could not be decoded: {exc}", field=field) from None


def start_timesteps(scheduler: Any, steps: int, strength: float) -> list[torch.Tensor]:
    """The timesteps an edit runs (diffusers' ``get_timesteps``); sets the scheduler's begin index."""
    init = min(int(steps * strength), steps)
    t_start = max(steps - init, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    if len(timesteps) == 0:
        raise InvalidRequestError(f"strength={strength} x num_inference_steps={steps} runs no step", field="strength",
                                  value=strength)
    return list(timesteps)


def _encode(vae: Any, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One latent sample per generator, each drawn from that image's own generator (diffusers' order)."""
    out = [vae.encode(image).latent_dist.sample(generator=g) for g in generators]
    return torch.cat(out) * vae.config.scaling_factor


@dataclass
class Edit:
    """What an edit job adds to a text-to-image job, per step and at the end."""

    image_latents: torch.Tensor | None = None  # (n, c, h, w) clean latents of the input (4-channel blend)
    noise: torch.Tensor | None = None  # the start noise; re-noises image_latents for the blend
    mask: torch.Tensor | None = None  # (n, 1, h, w) at latent size, 1 = repaint
    masked_latents: torch.Tensor | None = None  # (n, c, h, w): 9-channel UNets' extra input
    pixels: np.ndarray | None = None  # (H, W, 3) the input in [0, 1], pasted back outside the mask
    pixel_mask: np.ndarray | None = None  # (H, W, 1) binarized, 1 = repaint

    def unet_input(self, sample: torch.Tensor, cfg: bool) -> torch.Tensor:
        """9-channel inpainting UNets: the scaled latents, the mask and the masked image's latents."""
        if self.masked_latents is None or self.mask is None:
            return sample
        extra = torch.cat([self.mask, self.masked_latents], dim=1)
        if cfg:
            extra = torch.cat([extra] * 2)
        return torch.cat([sample, extra.to(sample.dtype)], dim=1)

    def blend(self, latents: torch.Tensor, step: int, timesteps: list[torch.Tensor], scheduler: Any) -> torch.Tensor:
        """4-channel inpainting after ``scheduler.step``: keep the input's latents (noised to the next step) outside
        the mask. ``step`` counts the steps done."""
        if self.image_latents is None or self.mask is None or self.masked_latents is not None:
            return latents
        proper = self.image_latents
        if step < len(timesteps):
            assert self.noise is not None
            proper = scheduler.add_noise(proper, self.noise, torch.tensor([timesteps[step]]))
        return (1 - self.mask) * proper + self.mask * latents

    def paste(self, arrays: np.ndarray) -> np.ndarray:
        """Decoded float images (NHWC) with the input's pixels outside the mask (exact after uint8 rounding)."""
        if self.pixels is None or self.pixel_mask is None:
            return arrays
        return arrays * self.pixel_mask + self.pixels * (1.0 - self.pixel_mask)


def prepare_edit(pipe: Any, req: ResolvedRequest, scheduler: Any, generators: list[torch.Generator],
                 device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor, Edit]:
    """Timesteps, start latents and :class:`Edit` of an img2img or inpainting request (scheduler's timesteps set)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    assert req.image is not None and req.strength is not None
    strength = float(req.strength)
    timesteps = start_timesteps(scheduler, req.num_inference_steps, strength)
    n = len(generators)
    vae = pipe.vae
    image = load_input_image(req.image, "image")
    with torch.inference_mode():
        init = pipe.image_processor.preprocess(image, height=req.height, width=req.width).to(torch.float32)
        init = init.to(device=device, dtype=dtype)
        start = timesteps[0].repeat(n)
        if req.mask_image is None:  # img2img
            encoded = _encode(vae, init, generators)
            noise = randn_tensor(encoded.shape, generator=generators, device=device, dtype=dtype)
            return timesteps, scheduler.add_noise(encoded, noise, start), Edit()
        mask_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False,
                                           do_binarize=True, do_convert_grayscale=True)
        mask_cond = mask_processor.preprocess(load_input_image(req.mask_image, "mask_image", "L"),
                                              height=req.height, width=req.width)
        nine = pipe.unet.config.in_channels == 9
        full = strength == 1.0
        latent_channels = vae.config.latent_channels
        shape = (n, latent_channels, req.height // pipe.vae_scale_factor, req.width // pipe.vae_scale_factor)
        image_latents = _encode(vae, init, generators) if (not nine or not full) else None
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        if full:
            latents = noise * scheduler.init_noise_sigma
        else:
            assert image_latents is not None
            latents = scheduler.add_noise(image_latents, noise, start)
        masked = init * (mask_cond < 0.5).to(device=device, dtype=dtype)
        masked_latents = _encode(vae, masked, generators)  # diffusers encodes it for 4-channel UNets too
        mask = torch.nn.functional.interpolate(mask_cond, size=shape[2:]).to(device=device, dtype=dtype).repeat(
            n, 1, 1, 1)
        pixels = ((init[0].float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
        pixel_mask = mask_cond[0].float().permute(1, 2, 0).numpy()
    edit = Edit(image_latents=image_latents, noise=noise, mask=mask, masked_latents=masked_latents if nine else None,
                pixels=pixels, pixel_mask=pixel_mask)
    return timesteps, latents, edit
