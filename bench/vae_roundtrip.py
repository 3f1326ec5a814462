"""The ceiling ``mini``'s VAE puts on its own evals: scenes rendered, encoded, decoded, then judged.

Why it matters: every picture ``mini`` draws goes through its VAE's decoder, so an eval can not score above what
survives an encode-decode round trip of the ideal picture. That ceiling decided issue 16's inpainting target:
with the (16, 32, 64)-channel VAE, small yellow stars on red, orange or white backgrounds came back orange in a
third of the inpaint targets, and the edit eval stuck at 87.5%. The analyser is 100% right on clean renders, so
each row compares the round trip against that (baseline 1.0). Scenes are the evals' own: ``eval_prompts`` (base
and concept sets) and the inpaint eval's target scenes (:func:`sdmaker.training._edit_eval.edit_cases`).

``python -m bench --only vae_roundtrip`` (seconds; ``--quick`` uses 32 scenes a set instead of 128);
``python -m bench.vae_roundtrip VAE_DIR`` prints the same figures for another VAE folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import row


def ceilings(n: int, vae_dir: Path | None = None) -> dict[str, Any]:
    """Fractions judged right after a round trip, and the inpaint targets' mean abs pixel error (0-255).

    ``vae_dir``: another VAE folder to measure (default: the built-in ``mini``'s).
    """
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from sdmaker.models import builtin_dir
    from sdmaker.training._analyser import analyse
    from sdmaker.training._data import image_to_tensor
    from sdmaker.training._edit_eval import edit_cases
    from sdmaker.training._eval import eval_prompts, score_item
    from sdmaker.training._scenes import render

    folder = vae_dir or builtin_dir("mini") / "vae"
    vae = AutoencoderKL.from_pretrained(folder).float().eval().requires_grad_(False)

    def round_trip(scene: Any) -> tuple[np.ndarray, np.ndarray]:
        image = render(scene).convert("RGB")
        with torch.no_grad():
            out = vae.decode(vae.encode(image_to_tensor(image)[None]).latent_dist.mean).sample
        clean = np.asarray(image)
        pixels = ((out[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return pixels, clean

    base = [score_item(it, analyse(round_trip(it.scene)[0]))["all"] for it in eval_prompts(n)]
    concept = [score_item(it, analyse(round_trip(it.scene)[0]))["drawn"]
               for it in eval_prompts(n, prompt_set="concept")]
    star, errors = [], []
    for case in edit_cases("inpaint", n):
        pixels, clean = round_trip(case.target)
        errors.append(float(np.abs(pixels.astype(np.float64) - clean).mean()))
        star.append(any(s.color == "yellow" and s.shape == "star" and s.center[0] > 32
                        for s in analyse(pixels).shapes))
    return {"n": n, "base": float(np.mean(base)), "concept": float(np.mean(concept)),
            "inpaint_star": float(np.mean(star)), "mae": float(np.mean(errors)),
            "channels": list(vae.config.block_out_channels)}


def run(quick: bool) -> list[dict[str, Any]]:
    got = ceilings(32 if quick else 128)
    what = f"mini's VAE, channels {tuple(got['channels'])}, {got['n']} scenes a set"
    return [
        row("VAE round-trip ceiling: base eval scenes judged all right after encode-decode (vs clean renders)",
            got["base"], 1.0, "fraction", what, lower_is_better=False),
        row("VAE round-trip ceiling: concept scenes (heart, pink) drawn right after encode-decode", got["concept"],
            1.0, "fraction", what, lower_is_better=False),
        row("VAE round-trip ceiling: inpaint targets with the yellow star still yellow on the right",
            got["inpaint_star"], 1.0, "fraction",
            f"{what}; mean abs pixel error {got['mae']:.2f}/255; the (16, 32, 64) VAE: 0.641, 6.33/255",
            lower_is_better=False),
    ]


if __name__ == "__main__":  # python -m bench.vae_roundtrip [VAE_DIR]: the same ceilings for any VAE folder
    import sys

    print(json.dumps(ceilings(128, Path(sys.argv[1]) if len(sys.argv) > 1 else None)))
