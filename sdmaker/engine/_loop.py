"""sdmaker's one denoising loop, split into per-request state (:class:`Job`) and shared UNet calls.

Every generation runs here: :func:`~sdmaker.engine.generate` is a one-job run of this loop and
:class:`~sdmaker.engine.StepBatcher` steps many jobs through it, one UNet call per step for all of
them. Each request becomes a :class:`Job` (its own generators, scheduler instance, step count, text
embeddings, latents). The per-request operations are the diffusers ``StableDiffusionPipeline``'s,
in its order (prompt encoding, latent noise from per-image CPU generators, ``scale_model_input``,
guidance, ``scheduler.step`` with the request's generators, VAE decode, post-processing), so a job
run alone matches the pipeline (fp32, <= 1e-4; the tests keep the pipeline as their reference) and a
job run inside a batch differs only by the UNet's batch arithmetic (<= 1e-4).

The one-of-each rules live here and nowhere else: :func:`scheduler_for` (scheduler setup),
:func:`image_generators` (seeds to noise), :func:`to_result` (result building) and
:func:`engine_errors` (torch failures, out-of-memory included, to sdmaker errors).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdmaker.engine._adapters import LoadedAdapter, adapter_rows, adapters_for
from sdmaker.engine._deepcache import UNetUnits, check_deepcache_support
from sdmaker.engine._edit import Edit, prepare_edit
from sdmaker.engine._loader import LoadedModel
from sdmaker.engine._preview import LatentPreview, ProgressCallback, StepProgress, fit_latent_preview, preview_interval
from sdmaker.engine._result import GeneratedImage, GenerationResult, StepCallback, negatives_of
from sdmaker.engine._schedulers import make_scheduler, scheduler_name_of
from sdmaker.errors import ConfigError, EngineError, InvalidRequestError, OutOfMemoryError, SdmakerError
from sdmaker.schema import GenerateRequest, ResolvedRequest

__all__ = ["Job", "as_engine_error", "decode_jobs", "deep_cache_interval_for", "engine_errors", "image_generators",
           "latent_preview_of", "prepare_jobs", "preview_images", "resolve", "run_unet", "scheduler_for", "to_result"]

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
    timestep_cond: torch.Tensor | None = None  # guidance embedding of UNets with time_cond_proj_dim (LCM)
    on_step: StepCallback | None = None
    deep_cache_interval: int = 0
    deep_cache_branch: int = 2
    step: int = 0
    cache: torch.Tensor | None = None
    unet_calls: int = 0
    #: what ``on_step`` raised: the job stops at the step boundary and fails alone, its batch-mates go on
    failure: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)
    #: progress reports (step, elapsed, ETA, previews) after every step
    on_progress: ProgressCallback | None = None
    #: ``previewer(job) -> one uint8 HWC image per output image`` (set when the request asks for previews)
    previewer: Callable[[Job], list[np.ndarray]] | None = None
    preview_every: int = 0
    #: when the job's first step began (ETA = time per step so far x steps left)
    running_since: float = field(default_factory=time.perf_counter)
    #: image-to-image / inpainting: extra UNet inputs, the mask blend after each step, the paste-back
    edit: Edit | None = None
    #: the request's LoRA adapters and scales, applied to this job's rows only (``_adapters``)
    adapters: list[tuple[LoadedAdapter, float]] = field(default_factory=list)

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
        sample = self.scheduler.scale_model_input(latents, self.timesteps[self.step])
        return sample if self.edit is None else self.edit.unet_input(sample, self.cfg)

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guidance + ``scheduler.step`` on this job's slice of the UNet output; then report progress."""
        t = self.timesteps[self.step]
        if self.cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.request.guidance_scale * (text - uncond)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **self.extra_step_kwargs,
                                           return_dict=False)[0]
        self.step += 1
        if self.edit is not None:
            self.latents = self.edit.blend(self.latents, self.step, self.timesteps, self.scheduler)
        if self.failure is not None:
            return
        try:
            if self.on_step is not None:
                self.on_step(self.step, len(self.timesteps))
            if self.on_progress is not None:
                self.on_progress(self.progress())
        except Exception as exc:  # noqa: BLE001 - the caller's callback (or its preview) fails its own job only
            self.failure = exc

    def progress(self) -> StepProgress:
        """This step's report; previews on the steps the request asked them for (never after the last step:
        the result follows at once)."""
        total = len(self.timesteps)
        now = time.perf_counter()
        per_step = (now - self.running_since) / max(self.step, 1)
        report = StepProgress(step=self.step, total=total, elapsed_s=now - self.started,
                              eta_s=per_step * (total - self.step))
        if (self.previewer is not None and self.preview_every > 0 and self.step < total
                and self.step % self.preview_every == 0):
            report.previews = self.previewer(self)
            report.preview_kind = self.request.preview
        return report


def scheduler_for(model: LoadedModel, request: ResolvedRequest) -> Any:
    """A fresh scheduler for one request: the requested one, else the model's own class (schedulers are stateful)."""
    base = model.pipeline.scheduler
    if request.scheduler:
        return make_scheduler(request.scheduler, base.config)
    return type(base).from_config(base.config)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per output image, seeded with that image's reported seed.

    Noise drawn on the CPU is the same on every device, and one generator per image makes an image
    independent of its position in a request or a batch: image ``i`` regenerates alone from its seed.
    """
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def as_engine_error(exc: BaseException, model: LoadedModel, requests: Sequence[ResolvedRequest] = ()) -> SdmakerError:
    """The sdmaker error for a failure inside the engine: the one place torch errors are mapped.

    sdmaker errors pass through; a device out-of-memory (``torch.OutOfMemoryError`` or a RuntimeError
    saying so, as some backends raise) becomes :class:`OutOfMemoryError` naming what was asked for;
    anything else becomes :class:`EngineError` (the original stays as ``__cause__``).
    """
    if isinstance(exc, SdmakerError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        images = sum(len(r.image_seeds()) for r in requests)
        sizes = sorted({f"{r.width}x{r.height}" for r in requests})
        asked = f" generating {images} image(s) at {', '.join(sizes)}" if requests else ""
        err: SdmakerError = OutOfMemoryError(f"out of memory{asked}; ask for fewer images or a smaller size",
                                             model=model.name)
    else:
        err = EngineError(f"generation failed: {exc}", model=model.name)
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def engine_errors(model: LoadedModel, requests: Sequence[ResolvedRequest] = ()) -> Iterator[None]:
    """Re-raise any failure inside the block as :func:`as_engine_error` maps it."""
    try:
        yield
    except SdmakerError:
        raise
    except Exception as exc:
        raise as_engine_error(exc, model, requests) from exc


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


def resolve(model: LoadedModel, request: GenerateRequest) -> ResolvedRequest:
    """``request`` with unset fields taken from the model's defaults, then the schema's."""
    return request if isinstance(request, ResolvedRequest) else request.resolve(model.defaults)


def latent_preview_of(model: LoadedModel) -> LatentPreview:
    """The model's approx-preview factors; fitted against its VAE (once, kept on ``model``) when none came with it."""
    if model.latent_preview is None:
        started = time.perf_counter()
        model.latent_preview = fit_latent_preview(model.pipeline.vae)
        logger.info("fitted latent preview factors for %s in %.2fs (import the model into the store to keep them)",
                    model.name, time.perf_counter() - started)
    return model.latent_preview


def _to_uint8(arrays: np.ndarray) -> list[np.ndarray]:
    return list((arrays * 255).round().astype(np.uint8))


def preview_images(model: LoadedModel, job: Job) -> list[np.ndarray]:
    """One preview per output image of ``job`` at its current step, as the request's ``preview`` asks.

    Reads the latents only (no generator is drawn from), so the job's result is unchanged.
    """
    req = job.request
    if req.preview == "vae":
        pipe = model.pipeline
        with torch.inference_mode():
            image = pipe.vae.decode(job.latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            arrays = pipe.image_processor.postprocess(image, output_type="np",
                                                      do_denormalize=[True] * image.shape[0])
        return _to_uint8(arrays)
    return latent_preview_of(model).rgb(job.latents, (req.height, req.width))


def prepare_jobs(model: LoadedModel, items: Sequence[tuple[GenerateRequest, StepCallback | None]], *,
                 deep_cache_interval: int | None = None, deep_cache_branch: int = 2,
                 progress: Sequence[ProgressCallback | None] | None = None) -> list[Job]:
    """Resolve, text-encode (one text-encoder call for all of ``items``) and noise each request.

    ``progress``: one :data:`ProgressCallback` (or None) per item; each gets the item's step reports and,
    when its request asks for them, previews.

    ``deep_cache_interval`` None: each request's own (resolved) ``deep_cache_interval``; an int overrides it
    for all (benchmarks compare settings on one model that way). Call with ``model.lock`` held: it reads the
    pipeline's scheduler config.
    """
    from diffusers.utils.torch_utils import randn_tensor

    _busy(model)
    pipe = model.pipeline
    unet = pipe.unet
    device = torch.device(model.placement.device)  # where load_model put every component
    resolved = [resolve(model, r) for r, _ in items]
    intervals = [deep_cache_interval_for(model, r, deep_cache_interval) for r in resolved]
    adapters = [adapters_for(model, r) for r in resolved]
    guided = unet.config.time_cond_proj_dim is None  # guidance-distilled UNets (LCM) take w as an input instead
    cfgs = [guided and r.guidance_scale > 1.0 for r in resolved]
    prompts: list[str] = []
    negs: list[str] = []
    for req in resolved:
        prompts += req.prompts
        negs += [n if n is not None else "" for n in negatives_of(req)]
    # The pipeline's own prompt encoder (tokenizer limits, attention masks, textual-inversion and LoRA hooks),
    # once for all prompts; each prompt's rows are then repeated per image, as the pipeline does.
    with torch.inference_mode():
        pos, neg = pipe.encode_prompt(prompts, device, 1, any(cfgs), negs if any(cfgs) else None)
    jobs: list[Job] = []
    offset = 0
    callbacks = list(progress) if progress is not None else [None] * len(items)
    for req, (_, on_step), interval, cfg, on_progress, lora in zip(resolved, items, intervals, cfgs, callbacks, adapters,
                                                                  strict=True):
        seeds = req.image_seeds()
        n, per, count = len(seeds), req.num_images_per_prompt, len(req.prompts)
        generators = image_generators(seeds)
        embeds = pos[offset:offset + count].repeat_interleave(per, dim=0)
        if cfg:
            embeds = torch.cat([neg[offset:offset + count].repeat_interleave(per, dim=0), embeds])
        offset += count
        scheduler = scheduler_for(model, req)
        scheduler.set_timesteps(req.num_inference_steps, device=device)
        shape = (n, unet.config.in_channels, req.height // pipe.vae_scale_factor, req.width // pipe.vae_scale_factor)
        timesteps, edit = list(scheduler.timesteps), None
        if req.image is not None:  # image-to-image / inpainting: later start, latents from the image
            timesteps, latents, edit = prepare_edit(pipe, req, scheduler, generators, device, pos.dtype)
        else:
            latents = randn_tensor(shape, generator=generators, device=device, dtype=pos.dtype)
            latents = latents * scheduler.init_noise_sigma
        timestep_cond = None
        if not guided:
            w = torch.tensor(req.guidance_scale - 1).repeat(n)
            timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=unet.config.time_cond_proj_dim).to(
                device=device, dtype=latents.dtype)
        jobs.append(Job(
            request=req, seeds=seeds, generators=generators, negatives=negatives_of(req), scheduler=scheduler,
            timesteps=timesteps, extra_step_kwargs=_step_kwargs(scheduler, generators), cfg=cfg,
            embeds=embeds, latents=latents, timestep_cond=timestep_cond, on_step=on_step,
            deep_cache_interval=interval, deep_cache_branch=deep_cache_branch, on_progress=on_progress, edit=edit,
            adapters=lora,
        ))
        job = jobs[-1]
        job.preview_every = preview_interval(req.preview, req.preview_every, len(job.timesteps))
        if on_progress is not None and job.preview_every > 0:
            job.previewer = lambda j: preview_images(model, j)
    now = time.perf_counter()
    for job in jobs:
        job.running_since = now
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


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _busy(model: LoadedModel) -> None:
    """Tell a background compile the worker is at work (text encoding, steps, decoding): it pauses."""
    if model.step_compiler is not None:
        model.step_compiler.note_busy()


def _working(model: LoadedModel) -> contextlib.AbstractContextManager[None]:
    """A background compile stays paused for the whole block (a UNet call or a decode may last many seconds)."""
    compiler = model.step_compiler
    return compiler.working() if compiler is not None else contextlib.nullcontext()


def _unet_call(model: LoadedModel, jobs: list[Job], *, full: bool) -> list[torch.Tensor]:
    pipe = model.pipeline
    inputs = [j.model_input() for j in jobs]
    sample = _cat(inputs)
    timestep = torch.cat([torch.full((x.shape[0],), float(j.timesteps[j.step]), dtype=torch.float32)
                          for j, x in zip(jobs, inputs, strict=True)]).to(sample.device)
    embeds = _cat([j.embeds for j in jobs])
    sizes = [x.shape[0] for x in inputs]
    # compiled passes serve adapter-free batches only: per-row LoRA hooks live on the torch modules
    compiler = None if any(j.adapters for j in jobs) else model.step_compiler
    with _working(model), adapter_rows(pipe.unet, [j.adapters for j in jobs], sizes):  # LoRA deltas per row
        if all(j.deep_cache_interval <= 1 for j in jobs):
            conds = [j.timestep_cond for j in jobs if j.timestep_cond is not None]
            if compiler is not None and not conds:
                runner = compiler.runner_for(sample, embeds)  # None: not built for this size (yet)
                if runner is not None:
                    return list(runner(sample, timestep, embeds).split(sizes))
            out = pipe.unet(sample, timestep, encoder_hidden_states=embeds,
                            timestep_cond=_cat(conds) if conds else None, return_dict=False)[0]
            return list(out.split(sizes))
        units = _units(model)  # refuses time_cond_proj_dim UNets, so no timestep_cond below
        branch = jobs[0].deep_cache_branch
        if full:
            runner = compiler.runner_for(sample, embeds, kind="full", branch=branch) if compiler else None
            if runner is not None:
                out, feature = runner(sample, timestep, embeds)
            else:
                out, feature = units.forward(sample, timestep, embeds, branch=branch)
            for j, f in zip(jobs, feature.split(sizes), strict=True):
                j.cache = f if j.deep_cache_interval > 1 else None
        else:
            # a shallow step follows a full one, which cached every job's features
            cached = _cat([j.cache for j in jobs if j.cache is not None])
            runner = compiler.runner_for(sample, embeds, kind="shallow", branch=branch) if compiler else None
            if runner is not None:
                out = runner(sample, timestep, embeds, cached)
            else:
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
    with _working(model), torch.inference_mode():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=generators)[0]
        arrays = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
    sizes = [j.latents.shape[0] for j in jobs]
    parts = np.split(arrays, np.cumsum(sizes)[:-1])
    return [part if j.edit is None else j.edit.paste(part) for j, part in zip(jobs, parts, strict=True)]


def to_result(model: LoadedModel, job: Job, arrays: np.ndarray) -> GenerationResult:
    """The :class:`GenerationResult` of a finished job: the one place results are built."""
    from diffusers.image_processor import VaeImageProcessor

    req = job.request
    per = req.num_images_per_prompt
    pils = VaeImageProcessor.numpy_to_pil(arrays)
    images = [GeneratedImage(image=img, seed=job.seeds[i], prompt=req.prompts[i // per],
                             negative_prompt=job.negatives[i // per], index=i) for i, img in enumerate(pils)]
    elapsed = time.perf_counter() - job.started
    steps = len(job.timesteps)
    logger.info("generated %d image(s) %dx%d, %d steps in %.2fs", len(images), req.width, req.height, steps, elapsed)
    return GenerationResult(
        images=images, request=req, scheduler=req.scheduler or scheduler_name_of(job.scheduler),
        model_name=model.name, model_digest=model.digest,
        timings={"total_s": elapsed, "per_step_s": elapsed / max(steps, 1), "unet_full_calls": float(job.unet_calls)},
        arrays=arrays, dtype=model.placement.dtype_name, tuned=model.tuned is not None,
        adapters=[{"name": a.name, "scale": scale, "digest": a.digest} for a, scale in job.adapters],
    )
