"""Image-to-image and inpainting on ``mini``: the UNet time strength saves, and the edit evals' pass rates.

* img2img at strength 0.5 vs txt2img at the same ``num_inference_steps``: the UNet runs
  ``int(steps x 0.5)`` steps instead of ``steps``, so its time should be about 0.5x. UNet time is summed
  by forward hooks on the UNet (DeepCache off, so every step is one plain UNet call); the whole request
  (text encoding, the img2img VAE encode, decoding) is reported beside it.
* The edit evals of ``sdmaker eval --task img2img|inpaint`` (:mod:`sdmaker.training._edit_eval`):
  pass rate against the issue's 90% target.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from bench import row, time_call

__all__ = ["run"]

STEPS = 20
IMAGES = 4


def _unet_timer(unet: Any) -> dict[str, float]:
    """Accumulate the UNet's forward time in ``clock["s"]`` (hooks stay for the process: bench only)."""
    clock = {"s": 0.0, "t0": 0.0}

    def pre(_m: Any, _args: Any) -> None:
        clock["t0"] = time.perf_counter()

    def post(_m: Any, _args: Any, _out: Any) -> None:
        clock["s"] += time.perf_counter() - clock["t0"]

    unet.register_forward_pre_hook(pre)
    unet.register_forward_hook(post)
    return clock


def _strength_rows(model: Any, quick: bool, *, steps: int = STEPS, images: int = IMAGES) -> list[dict[str, Any]]:
    from sdmaker.engine import generate
    from sdmaker.schema import GenerateRequest
    from sdmaker.training import render
    from sdmaker.training._edit_eval import edit_cases

    buf = io.BytesIO()
    render(edit_cases("img2img", 1)[0].source).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode("ascii")
    common: dict[str, Any] = {"prompt": "a large blue circle on the left on a green background", "seed": 1,
                              "num_inference_steps": steps, "num_images_per_prompt": images, "height": 64,
                              "width": 64, "deep_cache_interval": 0}
    txt = GenerateRequest(**common)
    img = GenerateRequest(**common, image=image, strength=0.5)
    clock = _unet_timer(model.pipeline.unet)
    repeat = 1 if quick else 3
    measured: dict[str, tuple[float, float, int]] = {}
    for name, req in (("txt2img", txt), ("img2img", img)):
        calls: list[int] = []
        unet: list[float] = []

        def once(r: GenerateRequest = req, u: list[float] = unet, c: list[int] = calls) -> None:
            clock["s"] = 0.0
            result = generate(model, r)
            u.append(clock["s"])
            c.append(int(result.timings["unet_full_calls"]))

        total = time_call(once, repeat=repeat, warmup=1)
        measured[name] = (sorted(unet)[len(unet) // 2], total, calls[-1])
    (u_img, t_img, c_img), (u_txt, t_txt, c_txt) = measured["img2img"], measured["txt2img"]
    note = (f"UNet calls {c_img} vs {c_txt}; img2img/txt2img = {u_img / u_txt:.2f}x UNet time (target ~0.5x); "
            f"{images}x64x64, {steps} steps, DeepCache off, median of {repeat}")
    return [
        row(f"img2img strength 0.5 vs txt2img, {steps} steps: UNet time", u_img, u_txt, "s", note),
        row(f"img2img strength 0.5 vs txt2img, {steps} steps: whole request", t_img, t_txt, "s",
            f"img2img/txt2img = {t_img / t_txt:.2f}x (adds one VAE encode per image)"),
    ]


def _eval_rows(model: Any, quick: bool) -> list[dict[str, Any]]:
    from sdmaker.training._edit_eval import evaluate_edits

    n = 8 if quick else 32
    rows = []
    for task, what in (("img2img", "red circle on the left -> blue at strength 0.7: blue circle, left"),
                       ("inpaint", "masked right half + 'a yellow star on the right': star there, left half "
                                   "unchanged (<= 2/255)")):
        report = evaluate_edits(model, task, n=n)
        m, s = report.metrics, report.settings
        detail = ", ".join(f"{k} {v:.1%}" for k, v in m.items() if k not in ("pass", "unmasked_diff"))
        if "unmasked_diff" in m:
            detail += f", mean unmasked diff {m['unmasked_diff'] * 255:.2f}/255"
        rows.append(row(f"edit eval {task} on mini ({n} held-out cases)", 100 * m["pass"], 90.0, "%",
                        f"{what}; {detail}; {s['num_inference_steps']} steps x strength {s['strength']}, "
                        f"{s['scheduler']}, g {s['guidance_scale']}; {report.seconds:.0f}s", lower_is_better=False))
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    from bench.batching import mini_model_dir
    from sdmaker.engine import load_model

    path, label = mini_model_dir()
    model = load_model(path, digest="-")  # auto precision: what generate/serve use
    rows = _strength_rows(model, quick)
    if label != "mini":  # random weights draw nothing the analyser could judge
        return rows + [row("edit evals", None, None, "%", f"NOT MEASURED: {label}")]
    return rows + _eval_rows(model, quick)
