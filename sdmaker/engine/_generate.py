"""Run one generation request on a loaded model: a one-job run of the engine loop.

``generate`` is the same loop the step batcher steps (``sdmaker.engine._loop``), with one job in
it, so ``sdmaker generate``, ``sdmaker serve`` and endpoints all produce their images one way.

Reproducibility: every output image has its own CPU ``torch.Generator`` seeded with its reported
seed (``request.seed + i``), so its initial noise (and any ancestral noise) does not depend on its
position in the request or batch, nor on the device. The same request with the same seed on the
same machine gives bit-identical images (a test asserts it); image ``i`` regenerated alone from
its own seed gives the same picture.
"""

from __future__ import annotations

from sdmaker.engine._adapters import merged_adapters
from sdmaker.engine._loader import LoadedModel
from sdmaker.engine._loop import decode_jobs, engine_errors, prepare_jobs, resolve, run_unet, to_result
from sdmaker.engine._preview import ProgressCallback
from sdmaker.engine._result import GenerationResult, StepCallback
from sdmaker.schema import GenerateRequest

__all__ = ["generate", "generate_fast"]


def generate(model: LoadedModel, request: GenerateRequest, *, on_step: StepCallback | None = None,
             on_progress: ProgressCallback | None = None) -> GenerationResult:
    """Generate the images of ``request`` with ``model``.

    Args:
        model: from :func:`~sdmaker.engine.load_model`.
        request: validated request; unset fields take the model's defaults, then the seed's
            (``deep_cache_interval`` included: DeepCache runs when the request or the model asks for it).
        on_step: progress callback, called after every denoising step with ``(step, total)``; ``total``
            counts the sampler's real UNet steps (PNDM adds one warm-up step, Heun two calls per step).
        on_progress: called after every step with a :class:`~sdmaker.engine.StepProgress` (step, elapsed,
            ETA, and the previews the request's ``preview`` asks for). Neither callback changes the images.

    Raises:
        InvalidRequestError: a field is invalid for this model (e.g. unknown scheduler).
        OutOfMemoryError: the device ran out of memory.
        EngineError: any other failure inside diffusers/torch, or raised by ``on_step``.
    """
    return generate_fast(model, request, on_step=on_step, on_progress=on_progress)


def generate_fast(model: LoadedModel, request: GenerateRequest, *, on_step: StepCallback | None = None,
                  deep_cache_interval: int | None = None, deep_cache_branch: int = 2,
                  on_progress: ProgressCallback | None = None) -> GenerationResult:
    """:func:`generate` with DeepCache settings that override the request's (benchmarks compare them this way).

    ``deep_cache_interval`` None: the request's own; an int overrides it. With 0 or 1 the images equal the
    diffusers pipeline's (<= 1e-4 in fp32).
    """
    resolved = resolve(model, request)
    with model.lock, engine_errors(model, [resolved]):
        (job,) = prepare_jobs(model, [(resolved, on_step)], deep_cache_interval=deep_cache_interval,
                              deep_cache_branch=deep_cache_branch, progress=[on_progress])
        with merged_adapters(model.pipeline.unet, job.adapters):  # alone: LoRAs merged once, not per layer call
            while not job.done:
                run_unet(model, [job])
                if job.failure is not None:
                    raise job.failure
        (arrays,) = decode_jobs(model, [job])
        return to_result(model, job, arrays)
