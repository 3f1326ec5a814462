"""Sample grids during/after training, the VAE latent scale, and the in-memory pipeline builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from sdmaker.training._scenes import render, sample_scene, scene_rng

__all__ = ["CONCEPT_SAMPLE_PROMPTS", "SAMPLE_PROMPTS", "build_pipeline", "contact_sheet", "sample_grid", "vae_latent_scale"]

SAMPLE_PROMPTS = (
    "a large red circle in the center on a white background",
    "black background, small yellow star at the top left",
    "a large green square on the right, blue background",
    "a small purple triangle at the bottom on a orange background",
    "a large blue circle to the left of a large yellow square, black background",
    "white background, a small orange star above a small green triangle",
    "a large white triangle in the bottom right corner on a purple background",
    "a large black square at the top, green background",
)

#: Sample prompts of a run whose data adds the opt-in concepts (a LoRA teaching heart and pink).
CONCEPT_SAMPLE_PROMPTS = (
    "a large pink heart in the center on a white background",
    "black background, small red heart at the top left",
    "a large pink square on the right, blue background",
    "a small green heart at the bottom on a pink background",
    "a large pink circle to the left of a large yellow heart, black background",
    "white background, a small orange star above a small pink triangle",
    "a large red circle in the center on a white background",
    "a large blue circle to the left of a large yellow square, black background",
)


@torch.no_grad()
def vae_latent_scale(vae: Any, cfg: dict[str, Any], n_batches: int = 4) -> float:
    """1 / std of the latents over fixed scenes: the ``scaling_factor`` giving unit-variance latents."""
    from sdmaker.training._data import image_to_tensor

    lat = []
    for b in range(n_batches):
        scenes = [sample_scene(scene_rng(cfg["seed"] + 99, b * 32 + i)) for i in range(32)]
        x = torch.stack([image_to_tensor(render(s)) for s in scenes])
        lat.append(vae.encode(x).latent_dist.mean)
    return float(1.0 / torch.cat(lat).std())


def contact_sheet(images: list[Image.Image], captions: list[str], *, cols: int = 4, cell: int = 128) -> Image.Image:
    """A grid of images, each scaled to ``cell`` pixels with its (wrapped) caption printed under it."""
    text_h = 40
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, text) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        words, lines, line = text.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > cell // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for j, ln in enumerate(lines[:4]):
            draw.text((x + 2, y + cell + 1 + j * 9), ln, fill=(0, 0, 0))
    return sheet


def build_pipeline(unet: Any, vae: Any, text_model_dir: Path, max_length: int, scheduler: str = "ddim",
                   prediction_type: str = "epsilon") -> Any:
    """A StableDiffusionPipeline in memory from trained parts + the frozen MiniLM (as the export builds it)."""
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer, BertModel

    from sdmaker.training._models import build_scheduler

    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=BertModel.from_pretrained(text_model_dir).eval(),
        tokenizer=AutoTokenizer.from_pretrained(text_model_dir, model_max_length=max_length),
        scheduler=build_scheduler(scheduler, prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe


@torch.no_grad()
def sample_grid(run: Any, out_dir: Path, step: int, text_model_dir: Path | None) -> Path:
    """Write ``samples/step-XXXXXX.png``: reconstructions (VAE) or generations of fixed prompts (UNet)."""
    model = run.ema_model()
    cfg = run.cfg
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(exist_ok=True)
    if cfg["kind"] == "vae":
        from sdmaker.training._data import image_to_tensor

        scenes = [sample_scene(scene_rng(cfg["seed"] + 7, i)) for i in range(8)]
        originals = [render(s) for s in scenes]
        x = torch.stack([image_to_tensor(im) for im in originals])
        y = model.decode(model.encode(x).latent_dist.mean).sample
        arr = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        recon = [Image.fromarray(a) for a in arr]
        images = [im for pair in zip(originals, recon, strict=True) for im in pair]
        captions = [t for _ in scenes for t in ("original", "reconstruction")]
    else:
        from diffusers import AutoencoderKL

        if text_model_dir is None:
            from sdmaker.engine import minilm_dir

            text_model_dir = minilm_dir()
        vae = AutoencoderKL.from_pretrained(cfg["vae"]).eval()
        pipe = build_pipeline(model, vae, text_model_dir, cfg["max_length"], prediction_type=cfg["prediction_type"])
        data = cfg.get("data", {})
        prompts = list(CONCEPT_SAMPLE_PROMPTS if data.get("extra_shapes") or data.get("extra_colors")
                       else SAMPLE_PROMPTS)
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, generator=gens, height=64,
                      width=64).images
        captions = prompts
    path = samples_dir / f"step-{step:06d}.png"
    contact_sheet(images, captions).save(path)
    return path
