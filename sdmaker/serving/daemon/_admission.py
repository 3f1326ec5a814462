"""Admission control of one endpoint: a request is taken only if it can finish within its timeout.

Overload must show up as an immediate ``503 ServiceUnavailable`` with ``Retry-After`` (which a client can back
off on), not as a ``424`` after the whole invocation timeout (issue 11: with 64 clients on one endpoint, 32 got
a 424 after 60 s and none a 503).

Work is counted in units a request's cost grows with: for the default handler, megapixel-steps
(``height x width x steps x images / 1e6``); for a ``code/inference.py`` endpoint, whose bodies are opaque,
one unit per request. The endpoint's throughput is *measured*: each completed request gives a sample of
worker-seconds per unit (its service time divided by its units and by the requests its worker ran at the
same time, so step batching's higher throughput is measured, not guessed), smoothed by an EWMA. Before the
first sample a deliberately slow prior is used, and requests beyond the workers' free slots are judged by it.

A request is refused with ``400`` when it cannot finish on an idle worker either (only from a measured rate,
the fastest one seen with a request's fixed cost taken off, so neither a bad prior nor a small request's
overhead ever refuses a reasonable request), or when its pixels exceed what a
worker may hold at once (:func:`memory_budget_pixels`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from sdmaker.errors import InvalidRequestError, QueueFullError
from sdmaker.schema import SEED_DEFAULTS, STRENGTH_DEFAULTS, input_image_info

__all__ = ["BATCH_SIZE_GROUPS", "WORKER_BASE_BYTES", "Admission", "Work", "memory_budget_pixels", "work_of_body",
           "worker_memory_floor", "OPAQUE_WORK"]

#: A deliberately slow prior (worker-seconds per megapixel-step, about SD 1.5 in fp32 on 2 busy CPU cores):
#: until the endpoint has served a request, queueing beyond its free slots is judged by it.
PRIOR_S_PER_UNIT = 4.0
#: Smoothing of the measured rate: recent requests weigh most (load, batch width and model all change it).
_EWMA_ALPHA = 0.3
#: Retry-After bounds in seconds.
_RETRY_AFTER_MAX = 60
#: Fraction of a worker's memory share that requests may fill (the rest: allocator slack, fragmentation).
_MEMORY_FRACTION = 0.6
#: A worker's memory before any request, besides the weights: Python, torch, diffusers and their buffers
#: (measured: 393 MiB after the imports, 577 MiB with the 97 MiB built-in model loaded).
_RUNTIME_BYTES = 512 * 1024**2
#: Live float tensors per pixel, estimated: the VAE decoder at full resolution keeps about this many
#: activations of its widest full-resolution block at once; the UNet works at 1/scale**2 of the pixels
#: (scale = the VAE's downsampling), twice for classifier-free guidance, with about this many activations
#: of its first block alive (attention at full latent resolution included). Calibrated on the built-in
#: model in bf16 (bench ``reliability``: a request at the budget, peak RSS against the memory given):
#: a 512x512 image cost 950 bytes per pixel above the loaded worker.
_VAE_LIVE_TENSORS = 12
_UNET_LIVE_TENSORS = 48


@dataclass(frozen=True)
class Work:
    """What one request costs: ``units`` of work (see the module docstring) and the ``pixels`` (height x width
    x images) a worker holds while it runs; ``opaque``: the body could not be read (custom handler)."""

    units: float
    pixels: int
    opaque: bool = False

    @property
    def described(self) -> str:
        return "1 request" if self.opaque else f"{self.units:g} megapixel-steps"


#: The work of a body sdmaker cannot read (a custom ``inference.py`` endpoint): one request.
OPAQUE_WORK = Work(units=1.0, pixels=0, opaque=True)


def work_of_body(canonical: bytes | None, *, default_size: int = 512) -> Work:
    """The work of a default-handler request from its canonical JSON (already validated by the daemon).

    Fields the caller left out take the seed's defaults (a model's own defaults live in the worker; the
    seed's 512x512 and 50 steps are what most models use). A non-JSON body (an image to an image model)
    counts as one default request.
    """
    data: dict[str, object] = {}
    if canonical is not None:
        loaded = json.loads(canonical)
        if isinstance(loaded, dict):
            data = loaded
            params = data.get("parameters")
            if isinstance(params, dict):
                data = {**data, **params}
    height = _int(data.get("height"), default_size)
    width = _int(data.get("width"), default_size)
    steps = _int(data.get("num_inference_steps"), int(SEED_DEFAULTS["num_inference_steps"]))
    image = data.get("image")
    if isinstance(image, str):  # an edit: the output size defaults to the image's; strength scales the steps
        with contextlib.suppress(InvalidRequestError):
            w, h = input_image_info(image)
            height, width = _int(data.get("height"), h // 8 * 8), _int(data.get("width"), w // 8 * 8)
        strength = data.get("strength")
        default = STRENGTH_DEFAULTS["inpaint" if data.get("mask_image") else "img2img"]
        steps = max(1, int(steps * (strength if isinstance(strength, (int, float)) else default)))
    prompt = data.get("prompt", data.get("inputs"))
    prompts = len(prompt) if isinstance(prompt, list) and prompt else 1
    images = prompts * _int(data.get("num_images_per_prompt"), int(SEED_DEFAULTS["num_images_per_prompt"]))
    pixels = height * width * images
    return Work(units=pixels * steps / 1e6, pixels=pixels)


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _channels(config: dict[str, object], default: int) -> int:
    blocks = config.get("block_out_channels")
    if isinstance(blocks, list) and blocks and all(isinstance(c, int) for c in blocks):
        return int(blocks[0])
    return default


def _weights_bytes(model_dir: Path) -> int:
    total = 0
    for pattern in ("*.safetensors", "*.bin", "*.ckpt"):
        for path in model_dir.rglob(pattern):
            if "code" not in path.relative_to(model_dir).parts:
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
    return total


#: Below this UNet weights size no compiled step is kept (``sdmaker.engine._compiled.MIN_PARAMS``: 100M
#: parameters, 200 MB in 16-bit).
_COMPILED_MIN_BYTES = 200 * 1000**2


def compiled_step_bytes(model_dir: Path) -> int:
    """Memory a worker's compiled UNet step adds: one more copy of the UNet weights (frozen into the package).

    Counted for SD-class UNets unless ``SDMAKER_COMPILE=off`` (what ``auto`` compiles; one size per worker).
    The file size over-counts fp32 files served in bf16, which errs on the safe side.
    """
    from sdmaker.config import load_settings

    if load_settings().compile == "off":
        return 0
    unet = 0
    for path in (model_dir / "unet").glob("*.safetensors"):
        with contextlib.suppress(OSError):
            unet += path.stat().st_size
    return unet if unet >= _COMPILED_MIN_BYTES else 0


def bytes_per_pixel(model_dir: Path, dtype: str) -> int:
    """Estimated peak bytes one output pixel costs a worker while it generates, from the model's configs.

    The VAE decoder's full-resolution block (``vae/config.json`` ``block_out_channels[0]``, 128 for SD) and the
    UNet's first block (``unet/config.json``, 320 for SD, at 1/scale**2 of the pixels where scale is the VAE's
    downsampling, doubled for guidance) times the bytes of the dtype. Unknown models get SD's sizes.
    """
    width = 2 if dtype in ("fp16", "bf16") else 4
    vae_config = _read_json(model_dir / "vae" / "config.json")
    vae = _channels(vae_config, 128)
    blocks = vae_config.get("block_out_channels")
    scale = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8
    unet = _channels(_read_json(model_dir / "unet" / "config.json"), 320)
    per_pixel = vae * _VAE_LIVE_TENSORS + unet * 2 * _UNET_LIVE_TENSORS / scale**2
    return max(1, int(math.ceil(per_pixel * width)))


def memory_budget_pixels(model_dir: Path, dtype: str, worker_memory_bytes: int) -> int:
    """Pixels (height x width x images, summed over a batch) one worker may hold at once.

    ``worker_memory_bytes`` is the worker's share of the machine's memory; the runtime (:data:`_RUNTIME_BYTES`)
    the model's weights and its compiled step (:func:`compiled_step_bytes`) come off it, then :data:`_MEMORY_FRACTION` of the rest is divided by
    :func:`bytes_per_pixel`. At least one 64x64 image.
    """
    room = (worker_memory_bytes - _RUNTIME_BYTES - _weights_bytes(model_dir) - compiled_step_bytes(model_dir)
            ) * _MEMORY_FRACTION
    return max(64 * 64, int(room / bytes_per_pixel(model_dir, dtype)))


#: What a worker process holds before its model: the interpreter with torch and diffusers imported (about
#: 0.5 GiB resident on CPU); the floor :func:`worker_memory_floor` adds to the weights.
WORKER_BASE_BYTES = 512 * 1024**2


def worker_memory_floor(model_dir: Path, dtype: str) -> int:
    """Bytes one worker of this model needs at least: its runtime, the weights and one 64x64 image at work.

    What the autoscaler checks a ``MaxCapacity`` against: that many workers must fit the endpoint's memory.
    """
    return WORKER_BASE_BYTES + _weights_bytes(model_dir) + compiled_step_bytes(model_dir) + int(64 * 64 * bytes_per_pixel(model_dir, dtype)
                                                               / _MEMORY_FRACTION)


#: Size groups a worker's step batcher runs side by side (``StepBatcher(max_groups=...)``'s default; the
#: daemon does not import the engine, so the number is repeated here and checked by a test).
BATCH_SIZE_GROUPS = 4


class Admission:
    """One endpoint's admission state: the work it has taken and not finished, and its measured rate."""

    def __init__(self, prior_s_per_unit: float = PRIOR_S_PER_UNIT) -> None:
        self.prior_s_per_unit = prior_s_per_unit
        #: EWMA of worker-seconds per unit, measured; ``None`` before the first completed request
        self.s_per_unit: float | None = None
        #: recent (units, seconds beyond the fixed cost) samples: the fixed cost is the fastest answer seen,
        #: about what any request costs however small (text encoder, VAE, HTTP)
        self._recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self.overhead_s: float | None = None
        self.samples = 0
        self.backlog_units = 0.0
        self.opaque = False

    @property
    def fastest(self) -> float | None:
        """The idle estimate in seconds per unit: the fastest rate among the largest recent requests (at least
        a quarter of the largest one's units, where the fixed cost weighs least), beyond the fixed cost.
        ``None`` until such a request took measurably longer than the fixed cost: it errs towards taking."""
        if not self._recent:
            return None
        largest = max(units for units, _ in self._recent)
        rates = [beyond / units for units, beyond in self._recent if units >= largest / 4 and beyond > 0]
        return min(rates) if rates else None

    @property
    def rate(self) -> float:
        return self.s_per_unit if self.s_per_unit is not None else self.prior_s_per_unit

    def expected_wait_s(self, workers: int) -> float:
        """Seconds until the work already taken is done, at the measured (or prior) rate."""
        return self.backlog_units * self.rate / max(1, workers)

    def check(self, work: Work, *, name: str, timeout_s: float, workers: int, free_slots: int,
              budget_pixels: int | None, share: int = 1) -> None:
        """Raise unless ``work`` may be taken now (the caller then calls :meth:`taken` and :meth:`done`).

        ``share``: how many requests of different sizes a worker runs side by side. The step batcher gives its
        size groups turns weighted by their work, so a request that gets a free slot waits for at most
        ``share - 1`` equal shares of the others' work, not for the whole backlog (a small request beside a
        huge one finishes in about ``share`` times its own time). 1 = first come, first served.

        Raises:
            InvalidRequestError: it exceeds a worker's memory budget, or cannot finish within ``timeout_s``
                even alone on an idle worker (measured rate only).
            QueueFullError: the work ahead of it cannot be done in time; ``retry_after`` seconds.
        """
        if budget_pixels is not None and work.pixels > budget_pixels:
            raise InvalidRequestError(
                f"this request needs {work.pixels} pixels at once (height x width x images); a worker of endpoint "
                f"{name} may hold at most {budget_pixels} (its memory budget): ask for fewer or smaller images",
                field="num_images_per_prompt", allowed=f"height x width x images <= {budget_pixels}")
        fastest = self.fastest
        if not work.opaque and fastest:
            alone = work.units * fastest
            if alone > timeout_s:
                raise InvalidRequestError(
                    f"this request ({work.described}) would take about {alone:.0f} s even on an idle worker of "
                    f"endpoint {name}, over its invocation timeout of {timeout_s:g} s (measured "
                    f"{fastest:.3g} s per megapixel-step): ask for fewer steps, pixels or images, or use "
                    "a larger endpoint timeout or the asynchronous API (InvokeEndpointAsync)",
                    field="num_inference_steps", allowed=f"at most about {timeout_s / fastest:.0f} "
                    "megapixel-steps")
        if free_slots > 0 and self.backlog_units == 0:
            return  # an idle endpoint takes any request that passed the checks above
        ahead = self.backlog_units
        if share > 1 and free_slots > 0:
            ahead = min(ahead, (share - 1) * work.units)
        finish = (ahead + work.units) * self.rate / max(1, workers)
        if free_slots > 0 and self.s_per_unit is None:
            return  # a free slot and nothing measured yet: do not refuse on the prior alone
        if finish > timeout_s:
            wait = self.expected_wait_s(workers)
            retry = min(_RETRY_AFTER_MAX, max(1, math.ceil(finish - timeout_s)))
            raise QueueFullError(
                f"Endpoint {name} is overloaded: the work ahead of this request takes about {wait:.1f} s, so it "
                f"could not finish within the invocation timeout of {timeout_s:g} s; retry after {retry} s",
                endpoint=name, retry_after=retry)

    def taken(self, work: Work) -> None:
        self.backlog_units += work.units
        self.opaque = self.opaque or work.opaque

    def done(self, work: Work, *, service_s: float | None, concurrency: float) -> None:
        """``work`` left the endpoint; ``service_s`` (time on its worker, ``None``: it failed) is a sample."""
        self.backlog_units = max(0.0, self.backlog_units - work.units)
        if service_s is None or work.units <= 0:
            return
        sample = service_s / work.units / max(1.0, concurrency)
        self.s_per_unit = sample if self.s_per_unit is None else (
            _EWMA_ALPHA * sample + (1 - _EWMA_ALPHA) * self.s_per_unit)
        self.samples += 1
        per_request = service_s / max(1.0, concurrency)
        self.overhead_s = per_request if self.overhead_s is None else min(self.overhead_s, per_request)
        self._recent.append((work.units, max(0.0, per_request - self.overhead_s)))
