"""OpenVINO as a second engine for the UNet passes: exported once per model, size and pass, then run by its CPU plugin.

Why (measured by ``bench/peers.py``): on CPUs with native bf16 OpenVINO's compiled SD 2.1 UNet step is faster
than torch's, eager or compiled (1.34-1.48x the compiled step on the AMD EPYC with AVX512-BF16, 1.11x on the AMX
Xeon). Its whole step reaches 0.8 of the bf16 floor on the AMD EPYC; torch's loses most in
attention, whose CPU flash kernel runs the first level's 4096-token self-attention at 0.35 of the GEMM peak
(``bench/attention.py``).

An engine must keep every speed feature, so two passes are exported per latent size, both with a free batch
dimension (step batching's changing batch sizes share them):

* ``full``: the whole UNet, returning the noise prediction *and* the deep feature DeepCache caches (see
  :class:`sdmaker.engine._deepcache.UNetUnits`); a plain CFG step uses it too and drops the feature, so one copy
  of the weights serves both;
* ``shallow``: DeepCache's in-between pass (the outermost ``branch`` down and up units) taking that feature.

End to end, serving 2 clients with step batching and the DeepCache recipe, it gave 1.24-1.27x the torch engine's
images/s there (``bench/openvino_engine.py``). The batch dimension stays free, although a static compile runs
the step faster, because each static compile keeps its own copy of the weights and step batching changes batch
size at every step.

The converted model is saved as OpenVINO IR (weights stored fp16 for a bf16 placement, fp32 otherwise; run in
the CPU plugin's inference precision: bf16 for a bf16 placement, f32 otherwise) beside the AOTInductor packages
in the compiled-step cache (:mod:`sdmaker.engine._compiled`, keyed by model digest, size, dtype and CPU flags),
so the next worker loads it in seconds instead of converting again (SD 2.1 at 512² on 2 cores: both passes
converted in 252 s, ``bench/openvino_engine.py`` on a machine without the cache).

The batch size a worker runs most gets a static-shape copy of the pass on top (:class:`OpenVinoRunner`), which
closes most of the gap to a static compile while other sizes keep the shared dynamic one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sdmaker.engine._deepcache import UNetUnits

__all__ = ["OpenVinoRunner", "available_memory_bytes", "convert_unet_pass", "openvino_available"]

logger = logging.getLogger(__name__)

#: The passes this engine exports (``kind`` of a compiled-step key).
PASSES = ("full", "shallow")


def openvino_available() -> bool:
    """Whether the ``openvino`` package is importable here (it is pinned in requirements.txt)."""
    return importlib.util.find_spec("openvino") is not None


class _FullPass(torch.nn.Module):
    """``(sample, timestep, embeds) -> (noise prediction, deep feature)`` for one DeepCache branch."""

    def __init__(self, unet: Any, branch: int) -> None:
        super().__init__()
        self.unet = unet
        self.units = UNetUnits(unet)
        self.branch = branch

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.units.forward(sample, timestep, embeds, branch=self.branch)


class _ShallowPass(_FullPass):
    """``(sample, timestep, embeds, cached feature) -> noise prediction``: DeepCache's in-between step."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,  # type: ignore[override]
                cached: torch.Tensor) -> torch.Tensor:
        return self.units.forward(sample, timestep, embeds, branch=self.branch, cached=cached)[0]


def convert_unet_pass(unet: Any, *, kind: str, branch: int, height: int, width: int, seq: int, out: Path,
                      batch: int = 2, fp16_weights: bool = True) -> Path:
    """Convert one pass of ``unet`` (fp32 weights) to OpenVINO IR in the folder ``out`` (written whole or not at all).

    The example inputs fix every dimension but the batch, which stays free. ``fp16_weights`` halves the file
    (for a bf16 placement, whose inference rounds the weights to bf16 anyway); an fp32 placement keeps fp32
    weights, so its passes equal torch's within float error. Runs in the compile child
    (:mod:`sdmaker.engine._compile_child`): conversion traces the module like torch.export does.
    """
    import openvino as ov

    if kind not in PASSES:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(PASSES)}")
    unet = unet.float().eval().requires_grad_(False)
    cfg = unet.config
    sample = torch.zeros(batch, cfg.in_channels, height, width)
    timestep = torch.full((batch,), 999.0)
    embeds = torch.zeros(batch, seq, cfg.cross_attention_dim)
    full = _FullPass(unet, branch)
    args: tuple[torch.Tensor, ...] = (sample, timestep, embeds)
    module: torch.nn.Module = full
    if kind == "shallow":
        with torch.no_grad():
            _, feature = full(sample, timestep, embeds)
        args = (*args, feature)
        module = _ShallowPass(unet, branch)
    # the tracer warns about diffusers' shape checks; the one that matters (``batch >= 64`` in the upsampler)
    # is kept out of reach by MAX_BATCH = 63
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        converted = ov.convert_model(module, example_input=args,
                                     input=[ov.PartialShape([-1, *a.shape[1:]]) for a in args])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=fp16_weights)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


#: Calls at one batch size before the runner compiles a static-shape copy for it (a one-off batch size, e.g. the
#: last step of a queue draining, should not cost a compile).
STATIC_AFTER = 4


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (what can be allocated without swapping), or ``None`` off Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class OpenVinoRunner:
    """One compiled pass, called like the torch module it replaces (torch tensors in, torch tensors out).

    Inputs go in as fp32 (the IR's input type; OpenVINO casts to its inference precision inside), outputs come
    back in the sample's dtype. Calls are serialised: a worker runs one UNet call at a time anyway, and an
    OpenVINO infer request is not reentrant.

    **Static copies of the busiest batch sizes.** The IR keeps its batch dimension free, so step batching's
    changing batch sizes share one compile. The CPU plugin runs a static-shape compile of the same IR faster
    (``bench/peers.py``: the SD 2.1 512² step 1.076 s static against 1.164 s dynamic on the AMX Xeon; the
    ONNX peer, compiled static, 1.051 s). So once a batch size has been called :data:`STATIC_AFTER` times, a
    background thread compiles a static copy for it and later calls at that size use it; every other size keeps
    the dynamic compile. Each copy holds its own repacked weights (about 2-3.4 GB for SD 2.1's full pass at 512²),
    so there are at most ``static_batches`` of them (``SDMAKER_OPENVINO_STATIC``, default 1; 0 turns them off),
    and one is only built while the machine has three times the IR's weight file free. The output is the
    dynamic compile's within bf16 rounding (the same graph and precision; the test holds fp32 to 1e-5).
    """

    def __init__(self, folder: Path, *, precision: str, static_batches: int = 1) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.xml = Path(folder) / "model.xml"
        hint = "bf16" if precision == "bf16" else "f32"
        # as many threads as torch has here: a worker limited to fewer cores (several workers on one machine)
        # keeps that limit on this engine too
        self.config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = self.core.compile_model(str(self.xml), "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.outputs = len(self.compiled.outputs)
        self.static_batches = max(0, int(static_batches))
        #: batch size -> infer request of its static compile
        self.static: dict[int, Any] = {}
        self.static_seconds: dict[int, float] = {}
        self.static_skipped: dict[int, str] = {}
        self._calls: dict[int, int] = {}
        self._building: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        dtype, device = inputs[0].dtype, inputs[0].device
        batch = int(inputs[0].shape[0])
        arrays = [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in inputs]
        with self._lock:
            request = self.static.get(batch, self.request)
            request.infer(arrays)
            outs = [torch.from_numpy(request.get_output_tensor(i).data.copy()).to(device, dtype)
                    for i in range(self.outputs)]
            self._note(batch)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _note(self, batch: int) -> None:
        """Count a call at ``batch``; the :data:`STATIC_AFTER`-th one starts its static compile if a slot is free."""
        self._calls[batch] = calls = self._calls.get(batch, 0) + 1
        if (calls != STATIC_AFTER or batch in self.static or batch in self._building
                or len(self.static) + len(self._building) >= self.static_batches):
            return
        need = 3 * (self.xml.with_suffix(".bin").stat().st_size if self.xml.with_suffix(".bin").exists() else 0)
        free = available_memory_bytes()
        if free is not None and free < need:
            self.static_skipped[batch] = f"{free / 1e9:.1f} GB free, under the {need / 1e9:.1f} GB a copy needs"
            logger.info("OpenVINO pass %s: no static copy for batch %d (%s)", self.xml.parent.name, batch,
                        self.static_skipped[batch])
            return
        thread = threading.Thread(target=self._build_static, args=(batch,), daemon=True,
                                  name=f"ov-static-{batch}")
        self._building[batch] = thread
        thread.start()

    def _build_static(self, batch: int) -> None:
        import openvino as ov

        started = time.perf_counter()
        try:
            model = self.core.read_model(str(self.xml))
            model.reshape({inp.get_any_name(): ov.PartialShape([batch, *list(inp.get_partial_shape())[1:]])
                           for inp in model.inputs})
            request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        except Exception as exc:  # noqa: BLE001 - without its static copy the size keeps the dynamic compile
            with self._lock:
                self.static_skipped[batch] = str(exc)[-300:]
                self._building.pop(batch, None)
            logger.warning("OpenVINO pass %s: static compile for batch %d failed: %s", self.xml.parent.name, batch,
                           str(exc)[-300:])
            return
        with self._lock:
            self.static[batch] = request
            self.static_seconds[batch] = time.perf_counter() - started
            self._building.pop(batch, None)
        logger.info("OpenVINO pass %s: static copy for batch %d compiled in %.1fs", self.xml.parent.name, batch,
                    self.static_seconds[batch])

    def wait_static(self, timeout: float | None = None) -> None:
        """Block until the static compiles in flight are done (benchmarks and tests)."""
        for thread in list(self._building.values()):
            thread.join(timeout)
