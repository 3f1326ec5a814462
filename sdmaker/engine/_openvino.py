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
images/s there (``bench/openvino_engine.py``). The batch dimension stays free although a static compile can run
the step faster: each static compile keeps its own copy of the weights, and step batching changes batch size
at every step.

The converted model is saved as OpenVINO IR (weights stored fp16 for a bf16 placement, fp32 otherwise; run in
the CPU plugin's inference precision: bf16 for a bf16 placement, f32 otherwise) beside the AOTInductor packages
in the compiled-step cache (:mod:`sdmaker.engine._compiled`, keyed by model digest, size, dtype and CPU flags),
so the next worker loads it in seconds instead of converting again (SD 2.1 at 512² on 2 cores: both passes
converted in 252 s, ``bench/openvino_engine.py`` on a machine without the cache).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from sdmaker.engine._deepcache import UNetUnits

__all__ = ["OpenVinoRunner", "convert_unet_pass", "openvino_available"]

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


class OpenVinoRunner:
    """One compiled pass, called like the torch module it replaces (torch tensors in, torch tensors out).

    Inputs go in as fp32 (the IR's input type; OpenVINO casts to its inference precision inside), outputs come
    back in the sample's dtype. Calls are serialised: a worker runs one UNet call at a time anyway, and an
    OpenVINO infer request is not reentrant.
    """

    def __init__(self, folder: Path, *, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        hint = "bf16" if precision == "bf16" else "f32"
        # as many threads as torch has here: a worker limited to fewer cores (several workers on one machine)
        # keeps that limit on this engine too
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = core.compile_model(str(Path(folder) / "model.xml"), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = len(self.compiled.outputs)
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        dtype, device = inputs[0].dtype, inputs[0].device
        arrays = [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in inputs]
        with self._lock:
            self.request.infer(arrays)
            outs = [torch.from_numpy(self.request.get_output_tensor(i).data.copy()).to(device, dtype)
                    for i in range(self.outputs)]
        return outs[0] if len(outs) == 1 else tuple(outs)
