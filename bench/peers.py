"""Peer runtimes on the same UNet step: sdmaker's torch path vs OpenVINO and ONNX Runtime, interleaved.

The SD 2.1-architecture UNet (random weights, published configs) at CFG batch 2, one denoising step with
the same inputs, on this CPU, timed round-robin (torch bf16, torch fp32, OpenVINO, ONNX Runtime, again ...)
so a load change on a shared machine lands on every runtime alike. Each row names the CPU flags seen and
the fraction of the machine's bf16 GEMM floor each runtime reaches (floor = the step's FLOPs at the
measured bf16 matmul peak; 1.0 would be a step that is nothing but peak-rate GEMMs).

* OpenVINO: the ONNX export read by ``openvino.Core`` and compiled for ``CPU`` with its defaults (on CPUs
  with AMX or AVX512-BF16 OpenVINO's default inference precision is bf16). Static input shapes.
* ONNX Runtime: the same ONNX file, ``CPUExecutionProvider``, fp32 (its CPU kernels have no bf16 path for
  these ops), default graph optimisations.
* The export is ``torch.onnx.export`` of the fp32 UNet (external weights file), cached in ``bench/cache``.

* sdmaker's own OpenVINO engine (:mod:`sdmaker.engine._openvino`; ``SDMAKER_ENGINE``, which ``auto`` sets to
  OpenVINO on AVX512-BF16 CPUs, AMX or not): the full pass a serving worker converts (batch dimension free), from
  the same cache as ``bench/openvino_engine.py``, timed after the calls that give a recurring batch size its
  static-shape copy (what a worker under a steady load runs). Where ``auto`` picks it, it is "ours"; a further row then
  gives the AOTInductor step (``SDMAKER_ENGINE=torch``) against eager with its payback.

``bench/openvino_engine.py`` holds the end-to-end comparison (step batching and DeepCache on) that the issue
asks an engine to win by 1.2x.

Quick mode times the step at 256x256 (latent 32) with 2 rounds; full mode at 512x512 with 5 rounds.
Peers that are not installed (``pip install openvino onnxruntime onnx onnxscript``, pinned in
requirements-dev.txt) give a ``NOT MEASURED`` row.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from bench import CACHE_DIR, row
from sdmaker.config import load_settings
from sdmaker.engine._device import SPEED_FLAGS, cpu_flags

__all__ = ["cpu_flags", "export_onnx", "run"]

logger = logging.getLogger(__name__)

class _UNetStep:
    """The UNet as a plain function of (sample, timestep, encoder_hidden_states) -> noise prediction."""

    def __init__(self, unet: Any) -> None:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, sample: Any, timestep: Any, embeds: Any) -> Any:
                return self.inner(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]

        self.module = Wrapped(unet).eval()


def export_onnx(unet: Any, inputs: tuple[Any, ...], out_dir: Path) -> tuple[Path, float]:
    """Export the fp32 ``unet`` for ``inputs``' shapes into ``out_dir`` (cached); returns (model path, seconds).

    The model and its external weights file are written into a temp folder renamed into place, so a
    crashed export is never mistaken for a cached one (and no second in-memory copy is made to rename them).
    """
    import os
    import shutil

    import torch

    model_path = out_dir / "unet.onnx"
    if model_path.is_file():
        return model_path, 0.0
    tmp = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(_UNetStep(unet).module, inputs, str(tmp / "unet.onnx"),
                          input_names=["sample", "timestep", "embeds"], output_names=["noise"],
                          external_data=True, dynamo=True, optimize=True)
    os.replace(tmp, out_dir)
    return model_path, time.perf_counter() - started


def _add_built_step(compiler: Any, sample: Any, t: Any, emb: Any, steps: dict[str, Any], notes: dict[str, str],
                    name: str, *, note: str, built_as: str, cached_as: str, cleanup: Any = None) -> None:
    """Add the plain step ``compiler`` builds (or loads from its cache) exactly as a serving worker gets it.

    ``notes[note]`` says how it was had: ``built_as`` plus the build seconds (``_payback`` reads them), or
    ``cached_as``; ``cleanup`` runs once the runner is loaded.
    """
    import torch

    s, e = sample.to(torch.bfloat16), emb.to(torch.bfloat16)
    compiler.runner_for(s, e)
    compiler.wait()
    runner = compiler.runner_for(s, e)
    if cleanup is not None:
        cleanup()
    if runner is None:
        notes[note] = f"build failed: {next(iter(compiler.failed.values()), '?')[-200:]}"
        return
    built = sum(compiler.compile_seconds.values())
    notes[note] = f"{built_as} in {built:.0f}s" if built else cached_as
    steps[name] = lambda: runner(s, t, e)


def _add_compiled_step(model: Any, sample: Any, t: Any, emb: Any, steps: dict[str, Any], notes: dict[str, str],
                       name: str, *, fresh: bool) -> None:
    """The compiled step exactly as a serving worker builds it (child process, AOTInductor, cached package)."""
    import shutil
    import tempfile

    from sdmaker.engine import StepCompiler, compile_decision

    on, why = compile_decision(model, "auto")
    if not on:
        notes["compiled"] = f"not compiled by default: {why}"
        return
    # full runs build in a fresh cache (the build time is a figure of the row: what a new machine pays once);
    # --quick reuses bench/cache/compiled, so the <= 10 minute subset pays the build once per machine
    cache = Path(tempfile.mkdtemp(prefix="sdmaker-bench-compiled-")) if fresh else CACHE_DIR / "compiled"
    _add_built_step(StepCompiler(model, cache, max_sizes=1), sample, t, emb, steps, notes, name, note="compiled",
                    built_as="AOTInductor package (batch dimension free, weights frozen) built in a child process",
                    cached_as="AOTInductor package from the cache",
                    # loaded: the 1.7 GB package is not needed on disk any more
                    cleanup=(lambda: shutil.rmtree(cache, ignore_errors=True)) if fresh else None)


def _add_openvino_engine_step(model: Any, sample: Any, t: Any, emb: Any, steps: dict[str, Any],
                              notes: dict[str, str], name: str) -> None:
    """sdmaker's OpenVINO engine exactly as a serving worker builds it (its full pass, converted in a child)."""
    from sdmaker.engine import StepCompiler
    from sdmaker.engine._openvino import openvino_available

    if not openvino_available():
        notes["engine"] = "openvino not installed"
        return
    compiler = StepCompiler(model, CACHE_DIR / "engine-compiled", max_sizes=1, backend="openvino",
                            static_batches=load_settings().openvino_static)
    _add_built_step(compiler, sample, t, emb, steps, notes, name, note="engine",
                    built_as="sdmaker's OpenVINO engine: the full pass converted from torch in a child process",
                    cached_as="sdmaker's OpenVINO engine: IR from bench/cache")
    if name not in steps:
        return
    # a worker serving a steady load: after STATIC_AFTER calls at one batch size, that size runs a static copy
    from sdmaker.engine._openvino import STATIC_AFTER

    for _ in range(STATIC_AFTER):
        steps[name]()
    static = []
    for runner in compiler.runners.values():
        runner.wait_static(timeout=600)
        static += [f"static copy for batch {b} compiled in {sec:.1f}s" for b, sec in runner.static_seconds.items()]
        static += [f"no static copy for batch {b}: {why}" for b, why in runner.static_skipped.items()]
    notes["engine"] += "; " + ("; ".join(static) or "no static copy (SDMAKER_OPENVINO_STATIC=0)")


def _payback(notes: dict[str, str], is_eager: bool, saved_s: float) -> str:
    """How many steps the compile takes to pay back, on the compiled-vs-eager row."""
    import re

    built = re.search(r"in (\d+)s$", notes.get("compiled", ""))
    if not is_eager or built is None:
        return ""
    if saved_s <= 0:
        return "; never pays back"
    steps = float(built.group(1)) / saved_s
    return f"; pays back after {steps:.0f} steps ({steps / 10:.0f} images at 10 steps)"


def _flops(fn: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from bench.engine import _register_cpu_sdpa_flops

    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run(quick: bool) -> list[dict[str, Any]]:
    import torch

    from bench.engine import sd21_dir

    if torch.cuda.is_available():
        return [row("peers: UNet step", None, None, "s/step", "CPU benchmark; skipped on a CUDA machine")]
    size, rounds = (256, 2) if quick else (512, 5)
    from sdmaker.engine import cpu_has_native_bf16

    return step_rows(sd21_dir("fp32"), sd21_dir("bf16") if cpu_has_native_bf16() else None, size=size,
                     rounds=rounds, label="SD2.1", fresh_compile=not quick)


def step_rows(fp32_dir: Path, bf16_dir: Path | None, *, size: int, rounds: int, label: str,
              gemm_n: int = 2048, fresh_compile: bool = True) -> list[dict[str, Any]]:
    """Interleaved UNet-step rows for the UNet of ``fp32_dir`` (and its bf16 copy) against the peers."""
    import numpy as np
    import torch

    from bench.engine import gemm_peak
    from sdmaker.engine import cpu_has_native_bf16, engine_decision, load_model

    flags = ", ".join(cpu_flags()) or "none of " + "/".join(SPEED_FLAGS)
    lat = size // 8
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, lat, lat, generator=gen)
    t = torch.tensor([500.0, 500.0])
    fp32 = load_model(fp32_dir, dtype="fp32", digest="-")
    emb = torch.randn(2, 77, int(fp32.pipeline.unet.config.cross_attention_dim), generator=gen)
    steps: dict[str, Any] = {}
    notes: dict[str, str] = {}

    def torch_step(unet: Any, dtype: Any) -> Any:
        s, e = sample.to(dtype), emb.to(dtype)

        def step() -> Any:
            with torch.inference_mode():
                return unet(s, t, encoder_hidden_states=e, return_dict=False)[0]
        return step

    steps["torch fp32 (seed path)"] = torch_step(fp32.pipeline.unet, torch.float32)
    bf16_name = "torch bf16 (sdmaker)"
    if bf16_dir is not None:
        bf16 = load_model(bf16_dir, dtype="bf16", digest="-")
        steps[bf16_name] = torch_step(bf16.pipeline.unet, torch.bfloat16)
    compiled_name = "torch bf16 compiled (SDMAKER_ENGINE=torch)"
    if bf16_dir is not None:
        _add_compiled_step(bf16, sample, t, emb, steps, notes, compiled_name, fresh=fresh_compile)
    engine_name = "sdmaker OpenVINO engine bf16 (served default here)"
    if bf16_dir is not None and engine_decision("auto")[0] == "openvino":
        _add_openvino_engine_step(bf16, sample, t, emb, steps, notes, engine_name)
    flops = _flops(steps["torch fp32 (seed path)"])
    feeds = {"sample": sample.numpy(), "timestep": t.numpy(), "embeds": emb.numpy()}
    have_onnx = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None
    onnx_path: Path | None = None
    if have_onnx and (importlib.util.find_spec("onnxruntime") or importlib.util.find_spec("openvino")):
        try:
            onnx_path, export_s = export_onnx(fp32.pipeline.unet, (sample, t, emb), CACHE_DIR / f"{label.lower()}-unet-{size}-onnx")
            notes["export"] = f"torch.onnx export {export_s:.0f}s" if export_s else "ONNX export cached"
        except Exception as exc:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
            logger.exception("ONNX export failed")
            notes["export"] = f"ONNX export failed: {type(exc).__name__}: {str(exc)[:200]}"
    if onnx_path is not None and importlib.util.find_spec("openvino") is not None:
        import openvino as ov

        core = ov.Core()
        core.set_property({"CACHE_DIR": str(CACHE_DIR / "openvino")})
        started = time.perf_counter()
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU")
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        notes["openvino"] = f"OpenVINO {ov.__version__}, compile {time.perf_counter() - started:.1f}s, precision {precision}"
        request = compiled.create_infer_request()
        steps[f"OpenVINO (default compile, {precision})"] = lambda: request.infer(feeds)
    if onnx_path is not None and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        notes["onnxruntime"] = f"ONNX Runtime {ort.__version__}"
        steps["ONNX Runtime fp32"] = lambda: session.run(None, feeds)
    for fn in steps.values():  # warm-up (first-call allocations, oneDNN primitive caches)
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: list[float] = []
    for _ in range(rounds):
        for name, fn in steps.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
        peaks.append(gemm_peak("bf16" if cpu_has_native_bf16() else "fp32", gemm_n, repeat=2))
    peak = max(peaks) * 1e9
    floor = flops / peak
    median = {name: float(np.median(v)) for name, v in times.items()}
    # ours: what a served SD-class model runs once its passes are built (the engine auto picks), else eager bf16
    ours_name = next(n for n in (engine_name, compiled_name, bf16_name, "torch fp32 (seed path)") if n in median)
    ours = median[ours_name]
    rows = []
    for name, value in median.items():
        if name == ours_name:
            continue
        rows.append(row(f"peers: {label} UNet step {size}² CFG 2, {ours_name} vs {name}", ours, value, "s/step",
                        f"median of {rounds} interleaved rounds (best {min(times[name]):.2f}s); {name} reaches "
                        f"{floor / value:.3g} of the bf16 floor ({floor:.3g}s at {peak / 1e9:.0f} GFLOP/s; "
                        f"{ours_name} {floor / ours:.3g}); "
                        f"CPU flags: {flags}; " + "; ".join(v for k, v in notes.items() if k in name.lower()
                                                             or (k == "export" and "torch" not in name)
                                                             or (k == "compiled" and name == bf16_name)
                                                             or (k == "engine" and ours_name == engine_name))
                        + _payback(notes, name == bf16_name and ours_name == compiled_name, value - ours)))
    if ours_name == engine_name and compiled_name in median and bf16_name in median:
        # what the AOTInductor path (SDMAKER_ENGINE=torch, and auto on CPUs without native bf16) earns over eager
        compiled, eager = median[compiled_name], median[bf16_name]
        rows.append(row(f"peers: {label} UNet step {size}² CFG 2, {compiled_name} vs {bf16_name}", compiled, eager,
                        "s/step",
                        f"median of {rounds} interleaved rounds; {notes.get('compiled', '')}"
                        + _payback(notes, True, eager - compiled)))
    if not any("OpenVINO" in n for n in steps):
        rows.append(row("peers: OpenVINO", None, None, "s/step", "NOT MEASURED: " + notes.get("export", "openvino "
                        "not installed (pip install -r requirements-dev.txt)")))
    if not any("ONNX" in n for n in steps):
        rows.append(row("peers: ONNX Runtime", None, None, "s/step", "NOT MEASURED: " + notes.get("export", "onnxruntime "
                        "not installed (pip install -r requirements-dev.txt)")))
    return rows
