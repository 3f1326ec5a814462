"""Pink through ``mini``'s VAE: the encoder's latents against latents fitted to the decoder (``data.fit_latents``).

Why it matters: an adapter learns the latents it is trained on, and only the decoder turns them into pixels. If
the encoder's latents of a pink scene decode pale, no adapter trained on them can draw pink. ``mini``'s first VAE
(8 named colours only) kept pink in 14 of 32 of these scenes, so the heart-pink recipe then fitted its training
latents to the decoder. Its VAE is now trained on random colours from the start, and the recipe trains on the
encoder's latents again. Held-out concept scenes with a pink shape (``scene_rng(777, i)``) are encoded,
optionally fitted with :func:`sdmaker.training._data.fit_latents` (10 Adam steps, lr 0.2, the old recipe's
settings), decoded, and judged by the analyser: the row counts the scenes whose pink shape still reads as pink.

``python -m bench --only lora_latents`` (about a minute on one thread; ``--quick`` uses fewer scenes).
"""

from __future__ import annotations

import json
from typing import Any

from bench import row

#: the fit the heart-pink recipe used while mini's VAE lost pink (a reference now: the recipe trains on the encoder's)
FIT = {"colors": ["pink"], "iters": 10, "lr": 0.2, "shape_weight": 9}


def pink_kept(scenes: int) -> dict[str, Any]:
    """How many pink scenes stay pink through the VAE: encoder latents, unweighted fit, the recipe's fit."""
    import torch
    from diffusers import AutoencoderKL

    from sdmaker.models import builtin_dir
    from sdmaker.training._analyser import analyse
    from sdmaker.training._data import fit_latents, image_to_tensor
    from sdmaker.training._scenes import render, sample_concept_scene, scene_rng

    torch.set_num_threads(1)  # the recipe fits in a one-thread data-loader process; deterministic there
    fit = FIT
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
        row("LoRA training latents: pink scenes still pink through mini's VAE, the encoder's latents (what the "
            "recipe trains on) vs fitted to the decoder", got["encoder"] / n, got["recipe"] / n, "fraction",
            f"{got['encoder']}/{n} vs {got['recipe']}/{n} held-out scenes; fit: {settings}, shapes' pixels weighted "
            f"1 + {fit.get('shape_weight', 0)}; unweighted fit {got['fitted']}/{n}; mini's first VAE (8 colours "
            "only) kept 14/32 from its encoder", lower_is_better=False),
    ]


if __name__ == "__main__":
    print(json.dumps(pink_kept(60)))
