"""Image-to-image and inpainting in sdmaker's loop: equal to diffusers' img2img/inpaint pipelines built with
``from_pipe`` on the same components (fp32, <= 1e-4), reproducible, batched with text-to-image requests."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdmaker.engine import StepBatcher, generate, make_scheduler, read_recipe
from sdmaker.schema import GenerateRequest, ResolvedRequest


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def scene(size: int = 64) -> Image.Image:
    """A smooth picture with structure (a random image would make the VAE's output meaningless)."""
    y, x = np.mgrid[0:size, 0:size] / size
    arr = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    arr[size // 4:size // 2, size // 8:size // 2] = [0.9, 0.1, 0.1]
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def right_half_mask(size: int = 64) -> Image.Image:
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[:, size // 2:] = 255
    return Image.fromarray(arr)


IMAGE, MASK = png_b64(scene()), png_b64(right_half_mask())


def reference(model: Any, request: GenerateRequest) -> np.ndarray:
    """diffusers' own img2img / inpaint pipeline on the model's components, as an sdmaker request asks."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    req = request if isinstance(request, ResolvedRequest) else request.resolve(model.defaults)
    base = model.pipeline
    kind = StableDiffusionInpaintPipeline if req.mask_image else StableDiffusionImg2ImgPipeline
    pipe = kind.from_pipe(base)
    pipe.scheduler = make_scheduler(req.scheduler, base.scheduler.config) if req.scheduler else \
        type(base.scheduler).from_config(base.scheduler.config)
    image = Image.open(io.BytesIO(base64.b64decode(req.image or ""))).convert("RGB")
    kwargs: dict[str, Any] = {}
    if req.mask_image:
        kwargs = {"mask_image": Image.open(io.BytesIO(base64.b64decode(req.mask_image))).convert("L"),
                  "height": req.height, "width": req.width}
    with model.lock, torch.inference_mode():
        out = pipe(prompt=req.prompts, image=image, strength=req.strength, num_inference_steps=req.num_inference_steps,
                   guidance_scale=req.guidance_scale, num_images_per_prompt=req.num_images_per_prompt,
                   generator=[torch.Generator("cpu").manual_seed(s) for s in req.image_seeds()], output_type="np",
                   **kwargs)
    arrays = np.asarray(out.images)
    if req.mask_image:  # the paste-back sdmaker does (diffusers' apply_overlay convention)
        keep = np.asarray(Image.open(io.BytesIO(base64.b64decode(req.mask_image))).convert("L"))[..., None] < 128
        arrays = np.where(keep, np.asarray(image, dtype=np.float32) / 255, arrays)
    return arrays


def _req(**kw: Any) -> GenerateRequest:
    base: dict[str, Any] = {"prompt": "a blue circle", "seed": 3, "num_inference_steps": 4, "guidance_scale": 7.5,
                            "image": IMAGE, "format": "png"}
    return GenerateRequest(**{**base, **kw})


@pytest.mark.parametrize(("kw"), [
    {"strength": 0.5},
    {"strength": 0.75, "scheduler": "euler_a", "num_images_per_prompt": 2},
    {"mask_image": MASK, "strength": 0.6},
    {"mask_image": MASK, "scheduler": "euler_a"},  # strength 1.0 (inpainting's default): starts from pure noise
], ids=["img2img", "img2img-ancestral-2", "inpaint", "inpaint-full-ancestral"])
def test_edit_matches_the_diffusers_pipelines(sd1_model, kw: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    req = _req(**kw)
    result = generate(sd1_model, req)
    assert result.arrays is not None
    ref = reference(sd1_model, req)
    assert result.arrays.shape == ref.shape
    assert float(np.abs(result.arrays - ref).max()) <= 1e-4
    resolved = result.request
    assert resolved.strength == kw.get("strength", 1.0 if "mask_image" in kw else 0.8)
    sched = make_scheduler(result.scheduler, sd1_model.pipeline.scheduler.config)
    sched.set_timesteps(4)
    skipped = (4 - int(4 * resolved.strength)) * sched.order  # the steps actually run scale with strength
    assert result.timings["unet_full_calls"] == len(sched.timesteps) - skipped


def test_inpainting_keeps_the_unmasked_pixels_exactly(sd1_model) -> None:  # type: ignore[no-untyped-def]
    result = generate(sd1_model, _req(mask_image=MASK, strength=0.9))
    out = np.asarray(result.images[0].image, dtype=np.int16)
    src = np.asarray(scene(), dtype=np.int16)
    assert np.array_equal(out[:, :32], src[:, :32])
    assert np.abs(out[:, 32:] - src[:, 32:]).mean() > 2  # the masked half was repainted


def test_defaults_size_from_image_and_recipe_has_digests(sd1_model) -> None:  # type: ignore[no-untyped-def]
    result = generate(sd1_model, GenerateRequest(prompt="x", image=IMAGE, mask_image=MASK, seed=1,
                                                 num_inference_steps=2, format="png"))
    assert (result.request.width, result.request.height) == (64, 64)
    recipe = read_recipe(result.encode(0))
    assert "image" not in recipe["request"] and "mask_image" not in recipe["request"]
    assert recipe["request"]["strength"] == 1.0
    import hashlib

    assert recipe["inputs"]["image_sha256"] == hashlib.sha256(base64.b64decode(IMAGE)).hexdigest()
    assert recipe["inputs"]["mask_image_sha256"] == hashlib.sha256(base64.b64decode(MASK)).hexdigest()
    again = generate(sd1_model, GenerateRequest(prompt="x", image=IMAGE, mask_image=MASK, seed=1,
                                                num_inference_steps=2, format="png"))
    assert again.arrays is not None and result.arrays is not None
    assert np.array_equal(again.arrays, result.arrays)  # reproducible by seed


def test_txt2img_img2img_and_inpaint_share_unet_calls(sd1_model) -> None:  # type: ignore[no-untyped-def]
    reqs = [GenerateRequest(prompt="a red square", seed=7, num_inference_steps=4, height=64, width=64),
            _req(strength=0.5), _req(mask_image=MASK, strength=0.75, seed=9)]
    solo = [generate(sd1_model, r).arrays for r in reqs]
    with StepBatcher(sd1_model, max_batch=8, heavy_step_s=None) as batcher:
        futures = [batcher.submit_async(r) for r in reqs]
        batched = [f.result().arrays for f in futures]
        stats = batcher.stats
    assert stats.completed == 3
    assert stats.steps < 4 + 2 + 3  # steps really were shared
    for a, b in zip(solo, batched, strict=True):
        assert a is not None and b is not None
        assert float(np.abs(a - b).max()) <= 1e-4


def test_nine_channel_inpainting_unet_matches_diffusers(sd1_model) -> None:  # type: ignore[no-untyped-def]
    """A 9-channel inpainting UNet (mask and masked-image latents as inputs), random weights, same components."""
    import dataclasses
    import threading

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**sd1_model.pipeline.unet.config, "in_channels": 9}).eval()
    base = sd1_model.pipeline
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    model = dataclasses.replace(sd1_model, pipeline=pipe, lock=threading.Lock())
    for kw in ({"strength": 0.75}, {}):
        req = _req(mask_image=MASK, **kw)
        result = generate(model, req)
        assert result.arrays is not None
        assert float(np.abs(result.arrays - reference(model, req)).max()) <= 1e-4
