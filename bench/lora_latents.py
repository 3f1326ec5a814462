"""Pink through ``mini``'s VAE: the encoder's latents against latents fitted to the decoder (``data.fit_latents``).

Why the heart-pink LoRA recipe fits its training latents: an adapter learns the latents it is trained on and only
the decoder turns them into pixels. Held-out concept scenes with a pink shape (``scene_rng(777, i)``) are
encoded, optionally fitted with :func:`sdmaker.training._data.fit_latents` at the recipe's settings, decoded,
and judged by the analyser: the row counts the scenes whose pink shape still reads as pink.

``python -m bench --only lora_latents`` (about a minute on one thread; ``--quick`` uses fewer scenes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import row

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "lora-heart-pink.json"


def pink_kept(scenes: int) -> dict[str, Any]:
    """How many pink scenes stay pink through the VAE: encoder latents, unweighted fit, the recipe's fit."""
    import torch
    from diffusers import AutoencoderKL

    from sdmaker.models import builtin_dir
    from sdmaker.training._analyser import analyse
    from sdmaker.training._data import fit_latents, image_to_tensor
    from sdmaker.training._scenes import render, sample_concept_scene, scene_rng

    torch.set_num_threads(1)  # the recipe fits in a one-thread data-loader process; deterministic there
    fit = json.loads(CONFIG.read_text())["data"]["fit_latents"]
    vae = AutoencoderKL.from_pretrained(builtin_dir("mini") / "vae").eval().requires_grad_(False)
    drawn = [sample_concept_scene(scene_rng(777, i), extra_shapes=("heart",), extra_colors=("pink",))
             for i in range(scenes)]
    pink = [s for s in drawn if any(shape.color == "pink" for shape in s.shapes)]
    images = torch.stack([image_to_tensor(render(s)) for s in pink])
    with torch.no_grad():
        encoded = vae.encode(images).latent_dist.mean

    def kept(latents: torch.Tensor) -> int:
        with torch.no_grad():
            pixels = ((vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        return sum("pink" in [d.color for d in analyse(p.numpy()).shapes] for p in pixels)

    plain = fit_latents(vae, encoded, images, iters=int(fit["iters"]), lr=float(fit["lr"]))
    recipe = fit_latents(vae, encoded, images, iters=int(fit["iters"]), lr=float(fit["lr"]),
                         shape_weight=float(fit.get("shape_weight", 0.0)))
    return {"scenes": len(pink), "encoder": kept(encoded), "fitted": kept(plain), "recipe": kept(recipe), "fit": fit}


def run(quick: bool) -> list[dict[str, Any]]:
    got = pink_kept(24 if quick else 60)
    n, fit = got["scenes"], got["fit"]
    settings = f"{fit['iters']} Adam steps at lr {fit['lr']}"
    return [
        row("LoRA training latents: pink scenes still pink through mini's VAE, fitted to the decoder (recipe) vs "
            "the encoder's", got["recipe"] / n, got["encoder"] / n, "fraction",
            f"{got['recipe']}/{n} vs {got['encoder']}/{n} held-out scenes; {settings}, shapes' pixels weighted "
            f"1 + {fit.get('shape_weight', 0)}; unweighted fit {got['fitted']}/{n}", lower_is_better=False),
    ]


if __name__ == "__main__":
    print(json.dumps(pink_kept(60)))
