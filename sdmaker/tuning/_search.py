"""Search scheduler x steps x DeepCache interval x precision for the fastest recipe that keeps a model's pictures.

What "keeps" means: the same prompts and seeds, run with the candidate, give images within
:data:`QUALITY_THRESHOLD` (mean ``1 - SSIM``, :mod:`sdmaker.tuning._metric`) of the model's *reference
recipe*: its own scheduler (the class in ``scheduler/scheduler_config.json``), 50 steps, fp32, DeepCache
off -- what the seed article's pipeline runs. The threshold is calibrated on ``mini`` against the
``sdmaker eval`` judge (``bench/tune.py``): the largest distance at which the judge's score stays within
1 point of the reference recipe's.

The search is pruned so that it stays cheap (``mini``: about a minute on 2 quiet cores):

1. the reference recipe, then the same recipe in each faster precision (bf16 on CPUs with native bf16,
   fp16 on CUDA); the rest of the search runs in the fastest precision that keeps the pictures;
2. per scheduler (the model's own first), a search down a ladder of step counts (coarse to fine,
   assuming fewer steps never get closer to the reference); later schedulers only probe step counts
   below the best found so far, since equal or more steps cannot be faster;
3. DeepCache intervals 2, 3, 4 on the two best schedulers, at their fewest passing steps and one rung
   above (DeepCache at 10 steps can beat 8 plain steps);
4. early reject: prompts run in chunks; a candidate stops as soon as the images done so far already
   push the mean over the bar (exact), or its first chunk is at more than twice the bar (a heuristic,
   marked as such in the table).

Time per image is the fastest chunk's time divided by its images (the minimum is the least disturbed by
other work on a shared machine). The choice is the fastest kept candidate (times within 10% of it count
as a tie, which the least UNet work breaks); the reference is always kept,
so a model whose pictures change under every fast recipe keeps its reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sdmaker.engine import LoadedModel, generate
from sdmaker.schema import LIMITS, SEED_DEFAULTS, ResolvedRequest, parse_request
from sdmaker.tuning._metric import METRIC_NAME, image_distances

__all__ = [
    "DEFAULT_PROMPTS",
    "QUALITY_THRESHOLD",
    "REFERENCE_STEPS",
    "STEP_LADDER",
    "Candidate",
    "Recipe",
    "TuneResult",
    "tune",
]

logger = logging.getLogger(__name__)

#: Steps of the reference recipe (the seed article's pipeline default).
REFERENCE_STEPS = 50
#: Step counts the search walks down (coarse to fine).
STEP_LADDER = (50, 40, 30, 25, 20, 15, 12, 10, 8, 6, 5, 4, 3)
DEEP_CACHE_INTERVALS = (2, 3, 4)
#: Samplers tried besides the model's own (fast multistep solvers, and DDIM).
FAST_SCHEDULERS = ("dpmpp_2m", "unipc", "ddim", "euler")
#: Largest mean ``1 - SSIM`` to the reference at which the ``sdmaker eval`` judge score of ``mini`` stayed
#: within 1 point of the reference recipe's, on every set of mini's weights measured by
#: ``python -m bench --quick --only tune`` (rows "tune calibration: ..."; n=32 eval prompts each):
#: first weights (2026-12-02): 0.00316 kept the score, the next recipe (dpmpp_2m 6 steps, 0.00728) lost one
#: attribute of one image (-1.56 points); fine-tuned weights (2026-12-02): everything up to 0.00571 kept it;
#: retrained weights (2026-12-03): everything up to 0.0429 kept it; retrained with the wider VAE (2026-12-04):
#: everything up to 0.0477 kept it. So 0.00571: the largest distance measured to keep the judge on one set of
#: weights and below every distance measured to lose it on any.
QUALITY_THRESHOLD = 0.00571
#: Times within this fraction of the fastest count as a tie, broken by UNet work (:func:`unet_work`).
TIE = 0.10
#: Cost of a DeepCache shallow step relative to a full UNet call (bench: 1.55 / 5.36 s on SD 2.1).
SHALLOW_COST = 0.29
#: Images per generate() call while tuning: the unit of early rejection and of timing.
CHUNK = 4

#: Prompts used when the model declares none (``"prompts"`` in its ``sdmaker.json``): varied subjects,
#: colours, layouts and styles, as users of a general text-to-image model write them.
DEFAULT_PROMPTS = (
    "a red apple on a wooden table",
    "a photograph of a mountain lake at sunrise",
    "a portrait of an old man with a grey beard",
    "a blue car parked on a city street",
    "a watercolor painting of a lighthouse",
    "a cat sleeping on a windowsill",
    "a bowl of ramen, top view",
    "a futuristic city skyline at night",
    "a yellow flower in a green field",
    "an astronaut riding a horse",
    "a cozy living room with a fireplace",
    "a black and white photo of a bridge",
    "a plate of pancakes with berries",
    "a small boat on a stormy sea",
    "a pencil sketch of a dog",
    "a snowy forest with a wooden cabin",
)


@dataclass(frozen=True)
class Recipe:
    """What a request and the loader can set: sampler, steps, DeepCache interval, precision.

    ``scheduler`` None means the pipeline's own scheduler class when it is none of the schema's names.
    """

    scheduler: str | None
    steps: int
    deep_cache_interval: int
    dtype: str

    def label(self) -> str:
        dc = f", DeepCache {self.deep_cache_interval}" if self.deep_cache_interval > 1 else ""
        return f"{self.scheduler or 'own'} {self.steps} steps{dc}, {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def card_defaults(self) -> dict[str, Any]:
        """The request defaults this recipe sets in the model's ``sdmaker.json``."""
        out: dict[str, Any] = {"num_inference_steps": self.steps, "deep_cache_interval": self.deep_cache_interval}
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler
        return out


@dataclass
class Candidate:
    """One measured recipe. ``status``: reference, kept, rejected (``note`` says why, e.g. early)."""

    recipe: Recipe
    status: str
    seconds_per_image: float | None = None
    distance: float | None = None
    images: int = 0
    note: str = ""

    @property
    def kept(self) -> bool:
        return self.status in ("reference", "kept", "chosen")

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "label": self.recipe.label(), "status": self.status,
                "seconds_per_image": None if self.seconds_per_image is None else round(self.seconds_per_image, 5),
                "distance": None if self.distance is None else round(self.distance, 5), "images": self.images,
                "note": self.note}


@dataclass
class TuneResult:
    """The measured candidates and the choice. ``chosen`` is the reference when nothing faster kept the pictures."""

    reference: Candidate
    chosen: Candidate
    candidates: list[Candidate]
    threshold: float
    height: int
    width: int
    guidance_scale: float
    prompts: int
    device: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        ref, got = self.reference.seconds_per_image, self.chosen.seconds_per_image
        return (ref / got) if ref and got else 1.0

    def record(self) -> dict[str, Any]:
        """What the store keeps about this tuning (``model show`` prints it; ``sdmaker.json`` carries it)."""
        return {
            "recipe": self.chosen.recipe.to_dict(),
            "reference": self.reference.recipe.to_dict(),
            "metric": METRIC_NAME,
            "distance": None if self.chosen.distance is None else round(self.chosen.distance, 5),
            "threshold": self.threshold,
            "seconds_per_image": self.chosen.seconds_per_image and round(self.chosen.seconds_per_image, 5),
            "reference_seconds_per_image": self.reference.seconds_per_image
            and round(self.reference.seconds_per_image, 5),
            "speedup": round(self.speedup, 3),
            "height": self.height, "width": self.width, "guidance_scale": self.guidance_scale,
            "prompts": self.prompts, "device": self.device, "tune_seconds": round(self.seconds, 1),
            "candidates": [c.to_dict() for c in self.candidates], **self.extra,
        }


ModelLoader = Callable[[str], LoadedModel]
ProgressCallback = Callable[[Candidate, int], None]


class _Search:
    def __init__(self, prompts: Sequence[str], height: int, width: int, guidance_scale: float, seed: int,
                 threshold: float, on_candidate: ProgressCallback | None) -> None:
        self.prompts = list(prompts)
        self.height, self.width, self.guidance = height, width, guidance_scale
        self.seed = seed
        self.threshold = threshold
        self.on_candidate = on_candidate
        self.candidates: list[Candidate] = []
        self.reference_arrays: np.ndarray | None = None
        self.seen: dict[Recipe, Candidate] = {}

    def request(self, recipe: Recipe, start: int) -> ResolvedRequest:
        data: dict[str, Any] = {
            "prompt": self.prompts[start:start + CHUNK], "seed": self.seed + start, "height": self.height,
            "width": self.width, "guidance_scale": self.guidance, "num_inference_steps": recipe.steps,
            "deep_cache_interval": recipe.deep_cache_interval, "format": "png",
        }
        if recipe.scheduler is not None:
            data["scheduler"] = recipe.scheduler
        # Resolved against no model defaults: a tuned model's own defaults must not leak into the reference.
        resolved: ResolvedRequest = parse_request(data).resolve({})
        return resolved

    def measure(self, model: LoadedModel, recipe: Recipe, *, reference: bool = False) -> Candidate:
        if recipe in self.seen:
            return self.seen[recipe]
        n = len(self.prompts)
        chunks: list[np.ndarray] = []
        times: list[float] = []
        dists: list[float] = []
        note = ""
        for start in range(0, n, CHUNK):
            request = self.request(recipe, start)
            began = time.perf_counter()
            result = generate(model, request)
            elapsed = time.perf_counter() - began
            times.append(elapsed / len(request.prompts))
            assert result.arrays is not None
            chunks.append(result.arrays)
            if reference:
                continue
            assert self.reference_arrays is not None
            dists += image_distances(result.arrays, self.reference_arrays[start:start + len(request.prompts)])
            done = len(dists)
            if done < n and sum(dists) / n > self.threshold:
                note = f"stopped after {done}/{n} images: the mean can no longer be within the bar"
                break
            if done < n and start == 0 and sum(dists) / done > 2 * self.threshold:
                note = f"stopped after {done}/{n} images: first images at more than twice the bar (heuristic)"
                break
        if reference:
            self.reference_arrays = np.concatenate(chunks)
            candidate = Candidate(recipe, "reference", min(times), 0.0, n, "the model's own recipe")
        else:
            distance = sum(dists) / len(dists)
            kept = not note and distance <= self.threshold
            candidate = Candidate(recipe, "kept" if kept else "rejected", min(times), distance, len(dists), note)
        self.seen[recipe] = candidate
        self.candidates.append(candidate)
        logger.info("tune: %s -> %s, %.4f s/image, distance %s", recipe.label(), candidate.status,
                    candidate.seconds_per_image or 0.0, candidate.distance)
        if self.on_candidate is not None:
            self.on_candidate(candidate, len(self.candidates))
        return candidate

    def fastest(self, candidates: Sequence[Candidate] | None = None) -> Candidate:
        """The kept candidate with the least time per image; near ties (within :data:`TIE`) go to the least
        UNet work, because a shared machine's noise is larger than such gaps (measured: 12 steps timed 7%
        faster than 10 steps of the same sampler under load)."""
        pool = [c for c in (candidates if candidates is not None else self.candidates) if c.kept]
        best = min(c.seconds_per_image or float("inf") for c in pool)
        close = [c for c in pool if (c.seconds_per_image or float("inf")) <= best * (1 + TIE)]
        return min(close, key=lambda c: (unet_work(c.recipe), c.seconds_per_image or float("inf")))

    def fewest_steps(self, model: LoadedModel, scheduler: str | None, dtype: str, known_pass: int | None,
                     below: int | None) -> int | None:
        """Fewest ladder steps at which ``scheduler`` keeps the pictures (None: none tried passed).

        ``known_pass``: a step count already known to pass; ``below``: only probe fewer steps than this.
        """
        ladder = [s for s in STEP_LADDER if below is None or s < below]
        if not ladder:
            return known_pass
        good: int | None = None  # index into ladder of the fewest passing steps so far
        bad = len(ladder)
        lo = -1
        if below is not None:
            # Probe the next rung first: a scheduler that cannot beat the best costs one run.
            first = self.measure(model, Recipe(scheduler, ladder[0], 0, dtype))
            if not first.kept:
                return known_pass
            good = lo = 0
        while bad - lo > 1:
            mid = (lo + bad) // 2
            if self.measure(model, Recipe(scheduler, ladder[mid], 0, dtype)).kept:
                good = lo = mid
            else:
                bad = mid
        return ladder[good] if good is not None else known_pass


def unet_work(recipe: Recipe) -> float:
    """UNet work of a recipe in full-call units: full steps plus DeepCache shallow steps at their measured cost."""
    if recipe.deep_cache_interval <= 1:
        return float(recipe.steps)
    full = -(-recipe.steps // recipe.deep_cache_interval)
    return full + (recipe.steps - full) * SHALLOW_COST


def _rung_above(steps: int) -> int | None:
    higher = [s for s in STEP_LADDER if s > steps]
    return min(higher) if higher else None


def tune(load: ModelLoader, *, dtypes: Sequence[str], prompts: Sequence[str] | None = None,
         height: int | None = None, width: int | None = None, guidance_scale: float | None = None,
         threshold: float = QUALITY_THRESHOLD, seed: int = 0, schedulers: Sequence[str] = FAST_SCHEDULERS,
         on_candidate: ProgressCallback | None = None, deep_cache: bool = True) -> TuneResult:
    """Measure candidate recipes on a model and return the fastest one that keeps its pictures.

    Args:
        load: returns the model loaded in a precision (``"fp32"``, ``"bf16"``, ``"fp16"``); called once per
            precision, fp32 first (the reference). The caller decides device and caching.
        dtypes: the precisions to try besides fp32 (those that are fast on this machine).
        prompts: the prompt set (>= 16 recommended); default: the model's own (``"prompts"`` in its
            ``sdmaker.json``), else :data:`DEFAULT_PROMPTS`.
        height, width, guidance_scale: the size and guidance to tune at; default: the model's own defaults,
            else its native size and the seed's guidance 7.5.
        threshold: largest mean ``1 - SSIM`` to the reference images that counts as the same pictures.
        on_candidate: called after each measured candidate with it and the number measured so far.
        deep_cache: also try DeepCache intervals (off for UNets DeepCache cannot cut).
    """
    started = time.perf_counter()
    ref_model = load("fp32")
    own = ref_model.default_scheduler
    card = _card(ref_model)
    prompt_list = list(prompts or card.get("prompts") or DEFAULT_PROMPTS)
    native = max(LIMITS["size_min"], -(-ref_model.native_size // 8) * 8)  # tiny test UNets are natively < 64 px
    h = height or int(card.get("height") or native)
    w = width or int(card.get("width") or native)
    g = guidance_scale if guidance_scale is not None else float(card.get("guidance_scale", SEED_DEFAULTS["guidance_scale"]))
    search = _Search(prompt_list, h, w, g, seed, threshold, on_candidate)
    reference = search.measure(ref_model, Recipe(own, REFERENCE_STEPS, 0, "fp32"), reference=True)

    # 1. precision: the reference recipe in each faster dtype; search in the fastest that keeps the pictures
    models = {"fp32": ref_model}
    search_dtype, best_time = "fp32", reference.seconds_per_image or float("inf")
    for dtype in dtypes:
        if dtype == "fp32":
            continue
        models[dtype] = load(dtype)
        c = search.measure(models[dtype], Recipe(own, REFERENCE_STEPS, 0, dtype))
        if c.kept and (c.seconds_per_image or float("inf")) < best_time:
            search_dtype, best_time = dtype, c.seconds_per_image or best_time
    model = models[search_dtype]
    for dtype in list(models):
        if dtype != search_dtype:
            del models[dtype]
    del ref_model

    # 2. steps per scheduler, own first; later ones must beat the fewest steps found so far
    order = [own, *[s for s in schedulers if s != own]]
    fewest: dict[str | None, int] = {}
    best_steps: int | None = None
    for scheduler in order:
        known = REFERENCE_STEPS if scheduler == own else None
        got = search.fewest_steps(model, scheduler, search_dtype, known, best_steps)
        if got is not None and (scheduler == own or best_steps is None or got < best_steps):
            fewest[scheduler] = got
            best_steps = got if best_steps is None else min(best_steps, got)
        elif got is not None:
            fewest[scheduler] = got

    # 3. DeepCache on the two schedulers with the fewest steps, at that count and one rung above
    if deep_cache:
        from sdmaker.engine._deepcache import check_deepcache_support
        from sdmaker.errors import ConfigError

        try:
            check_deepcache_support(model.pipeline.unet)
        except ConfigError:
            deep_cache = False
    if deep_cache:
        ranked = sorted(fewest.items(), key=lambda kv: kv[1])[:2]
        for scheduler, steps in ranked:
            for base in (steps, _rung_above(steps)):
                if base is None or base > REFERENCE_STEPS:
                    continue
                for interval in DEEP_CACHE_INTERVALS:
                    if interval >= base:
                        break
                    if not search.measure(model, Recipe(scheduler, base, interval, search_dtype)).kept:
                        break

    chosen = search.fastest()
    if chosen is not reference and chosen.status == "kept":
        chosen.status = "chosen"
    else:
        reference.note = "the model's own recipe; nothing faster kept its pictures"
    device = model.placement.device
    return TuneResult(reference=reference, chosen=chosen, candidates=search.candidates, threshold=threshold,
                      height=h, width=w, guidance_scale=g, prompts=len(prompt_list), device=device,
                      seconds=time.perf_counter() - started)


def _card(model: LoadedModel) -> dict[str, Any]:
    """The model's untuned defaults and declared prompts (from ``sdmaker.json``; tuned keys excluded)."""
    from sdmaker.engine._loader import read_model_card

    card = read_model_card(model.path)
    tuned = card.get("tuned") if isinstance(card.get("tuned"), dict) else {}
    before = tuned.get("defaults_before") if tuned else card.get("defaults")
    out: dict[str, Any] = dict(before) if isinstance(before, dict) else {}
    prompts = card.get("prompts")
    if isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) and prompts:
        out["prompts"] = prompts
    return out
