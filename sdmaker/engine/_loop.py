"""sdmaker's own denoising loop, split into per-request state and shared UNet calls.

``generate`` runs the diffusers pipeline whole. Step-level batching and DeepCache need the loop
opened up: each request becomes a :class:`Job` (its own generators, scheduler instance, step count,
text embeddings, latents), and one UNet call may serve the current step of several jobs. Every
per-request operation is the pipeline's own, in the pipeline's order (prompt encoding, latent
noise from per-image CPU generators, ``scale_model_input``, guidance, ``scheduler.step`` with the
request's generators, VAE decode, post-processing), so a job run alone reproduces ``generate``
and a job run inside a batch differs only by the UNet's batch arithmetic (tests assert <= 1e-4).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdmaker.engine._deepcache import UNetUnits, check_deepcache_support
from sdmaker.engine._generate import GeneratedImage, GenerationResult, StepCallback, _negatives
from sdmaker.engine._loader import LoadedModel
from sdmaker.engine._schedulers import make_scheduler, scheduler_name_of
from sdmaker.errors import ConfigError, InvalidRequestError
from sdmaker.schema import GenerateRequest, ResolvedRequest

__all__ = ["Job", "decode_jobs", "deep_cache_interval_for", "generate_fast", "prepare_jobs", "run_unet"]

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request in flight: everything that must stay per request when steps are batched."""

    request: ResolvedRequest
    seeds: list[int]
    generators: list[torch.Generator]
    negatives: list[str | None]
    scheduler: Any
    timesteps: list[torch.Tensor]
    extra_step_kwargs: dict[str, Any]
    cfg: bool
    embeds: torch.Tensor  # (rows, seq, dim): [negatives; positives] under CFG
    latents: torch.Tensor  # (images, c, h, w)
    on_step: StepCallback | None = None
    deep_cache_interval: int = 0
    deep_cache_branch: int = 2
    step: int = 0
    cache: torch.Tensor | None = None
    unet_calls: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    @property
    def rows(self) -> int:
        return self.latents.shape[0] * (2 if self.cfg else 1)

    @property
    def full_step(self) -> bool:
        """Whether this step runs the whole UNet (always, unless DeepCache reuses the deep feature)."""
        interval = self.deep_cache_interval
        return interval <= 1 or self.cache is None or self.step % interval == 0

    def model_input(self) -> torch.Tensor:
        latents = torch.cat([self.latents] * 2) if self.cfg else self.latents
        return self.scheduler.scale_model_input(latents, self.timesteps[self.step])

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guidance + ``scheduler.step`` on this job's slice of the UNet output; then report progress."""
        t = self.timesteps[self.step]
        if self.cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.request.guidance_scale * (text - uncond)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **self.extra_step_kwargs,
                                           return_dict=False)[0]
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step, len(self.timesteps))


def _scheduler_for(model: LoadedModel, request: ResolvedRequest) -> Any:
    base = model.pipeline.scheduler
    if request.scheduler:
        return make_scheduler(request.scheduler, base.config)
    return type(base).from_config(base.config)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def deep_cache_interval_for(model: LoadedModel, request: ResolvedRequest, override: int | None = None) -> int:
    """The DeepCache interval ``request`` runs with (``override`` wins); refuses it on a UNet DeepCache can't cut.

    The step batcher calls this when a request is submitted, so a bad request fails alone instead of
    failing the batch it would have joined.
    """
    interval = override if override is not None else request.deep_cache_interval
    if interval > 1:
        try:
            check_deepcache_support(model.pipeline.unet)
        except ConfigError as exc:
            raise InvalidRequestError(f"deep_cache_interval={interval} cannot be used with this model: "
                                      f"{exc.message}", field="deep_cache_interval", value=interval,
                                      allowed="0 (off) for this model") from exc
    return interval


def prepare_jobs(model: LoadedModel, items: Sequence[tuple[GenerateRequest, StepCallback | None]], *,
                 deep_cache_interval: int | None = None, deep_cache_branch: int = 2) -> list[Job]:
    """Resolve, text-encode (one text-encoder call for all of ``items``) and noise each request.

    ``deep_cache_interval`` None: each request's own (resolved) ``deep_cache_interval``; an int overrides it
    for all (benchmarks compare settings on one model that way). Call with ``model.lock`` held: it reads the
    pipeline's scheduler config.
    """
    from diffusers.utils.torch_utils import randn_tensor

    pipe = model.pipeline
    device = pipe._execution_device
    resolved = [r if isinstance(r, ResolvedRequest) else r.resolve(model.defaults) for r, _ in items]
    intervals = [deep_cache_interval_for(model, r, deep_cache_interval) for r in resolved]
    prompts: list[str] = []
    negs: list[str] = []
    for req in resolved:
        per = req.num_images_per_prompt
        for prompt, neg in zip(req.prompts, _negatives(req), strict=True):
            prompts += [prompt] * per
            negs += [neg if neg is not None else ""] * per
    with torch.inference_mode():
        pos, neg = pipe.encode_prompt(prompts, device, 1, True, negs)
    jobs: list[Job] = []
    offset = 0
    for req, (_, on_step), interval in zip(resolved, items, intervals, strict=True):
        seeds = req.image_seeds()
        n = len(seeds)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        cfg = req.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        embeds = pos[offset:offset + n]
        if cfg:
            embeds = torch.cat([neg[offset:offset + n], embeds])
        offset += n
        scheduler = _scheduler_for(model, req)
        scheduler.set_timesteps(req.num_inference_steps, device=device)
        shape = (n, pipe.unet.config.in_channels, req.height // pipe.vae_scale_factor,
                 req.width // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=pos.dtype)
        latents = latents * scheduler.init_noise_sigma
        jobs.append(Job(
            request=req, seeds=seeds, generators=generators, negatives=_negatives(req), scheduler=scheduler,
            timesteps=list(scheduler.timesteps), extra_step_kwargs=_step_kwargs(scheduler, generators), cfg=cfg,
            embeds=embeds, latents=latents, on_step=on_step, deep_cache_interval=interval,
            deep_cache_branch=deep_cache_branch,
        ))
    return jobs


def _units(model: LoadedModel) -> UNetUnits:
    """The unit view of the model's UNet, built once and kept on the pipeline object."""
    pipe = model.pipeline
    units = getattr(pipe, "_sdmaker_units", None)
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    if units is None or units.unet is not unet:
        units = UNetUnits(unet)
        pipe._sdmaker_units = units
    return units


def _unet_call(model: LoadedModel, jobs: list[Job], *, full: bool) -> list[torch.Tensor]:
    pipe = model.pipeline
    inputs = [j.model_input() for j in jobs]
    sample = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
    timestep = torch.cat([torch.full((x.shape[0],), float(j.timesteps[j.step]), dtype=torch.float32)
                          for j, x in zip(jobs, inputs, strict=True)]).to(sample.device)
    embeds = torch.cat([j.embeds for j in jobs]) if len(jobs) > 1 else jobs[0].embeds
    sizes = [x.shape[0] for x in inputs]
    if all(j.deep_cache_interval <= 1 for j in jobs):
        out = pipe.unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        return list(out.split(sizes))
    units = _units(model)
    branch = jobs[0].deep_cache_branch
    if full:
        out, feature = units.forward(sample, timestep, embeds, branch=branch)
        for j, f in zip(jobs, feature.split(sizes), strict=True):
            j.cache = f if j.deep_cache_interval > 1 else None
    else:
        # a shallow step follows a full one, which cached every job's features
        cached = torch.cat([j.cache for j in jobs if j.cache is not None]) if len(jobs) > 1 else jobs[0].cache
        out, _ = units.forward(sample, timestep, embeds, branch=branch, cached=cached)
    return list(out.split(sizes))


def run_unet(model: LoadedModel, jobs: list[Job]) -> None:
    """Run the current step of every job: at most two UNet calls (full, and DeepCache-shallow)."""
    with torch.inference_mode():
        branches = {j.deep_cache_branch for j in jobs if j.deep_cache_interval > 1}
        if len(branches) > 1:
            raise ConfigError("jobs in one batch must share deep_cache_branch", field="deep_cache_branch")
        full = [j for j in jobs if j.full_step]
        shallow = [j for j in jobs if not j.full_step]
        for group, is_full in ((full, True), (shallow, False)):
            if not group:
                continue
            outs = _unet_call(model, group, full=is_full)
            for job, out in zip(group, outs, strict=True):
                job.unet_calls += int(is_full)
                job.advance(out)


def decode_jobs(model: LoadedModel, jobs: list[Job]) -> list[np.ndarray]:
    """VAE-decode finished jobs in one call; float images in [0, 1], NHWC, one array per job."""
    pipe = model.pipeline
    latents = torch.cat([j.latents for j in jobs])
    generators = [g for j in jobs for g in j.generators]
    with torch.inference_mode():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=generators)[0]
        arrays = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
    sizes = [j.latents.shape[0] for j in jobs]
    return list(np.split(arrays, np.cumsum(sizes)[:-1]))


def to_result(model: LoadedModel, job: Job, arrays: np.ndarray) -> GenerationResult:
    """The :class:`GenerationResult` of a finished job (same type and fields as ``generate``'s)."""
    from diffusers.image_processor import VaeImageProcessor

    req = job.request
    per = req.num_images_per_prompt
    pils = VaeImageProcessor.numpy_to_pil(arrays)
    images = [GeneratedImage(image=img, seed=job.seeds[i], prompt=req.prompts[i // per],
                             negative_prompt=job.negatives[i // per], index=i) for i, img in enumerate(pils)]
    elapsed = time.perf_counter() - job.started
    result = GenerationResult(
        images=images, request=req, scheduler=req.scheduler or scheduler_name_of(job.scheduler),
        model_name=model.name, model_digest=model.digest,
        timings={"total_s": elapsed, "per_step_s": elapsed / max(len(job.timesteps), 1),
                 "unet_full_calls": float(job.unet_calls)},
    )
    result.arrays = arrays  # type: ignore[attr-defined]  # float images, for exactness checks
    return result


def generate_fast(model: LoadedModel, request: GenerateRequest, *, on_step: StepCallback | None = None,
                  deep_cache_interval: int | None = None, deep_cache_branch: int = 2) -> GenerationResult:
    """Like :func:`~sdmaker.engine.generate`, through sdmaker's own loop (which adds DeepCache).

    ``deep_cache_interval`` None: the request's own; an int overrides it. With 0 or 1 the images equal the
    diffusers pipeline's (<= 1e-4 in float).
    """
    with model.lock:
        (job,) = prepare_jobs(model, [(request, on_step)], deep_cache_interval=deep_cache_interval,
                              deep_cache_branch=deep_cache_branch)
        while not job.done:
            run_unet(model, [job])
        (arrays,) = decode_jobs(model, [job])
    return to_result(model, job, arrays)
