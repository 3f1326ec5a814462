"""The child process that exports and compiles one UNet pass (``python -m sdmaker.engine._compile_child SPEC``).

Run by :class:`sdmaker.engine._compiled.StepCompiler`, never by hand. It lives in its own process because
export and Inductor trace by patching ``torch.nn.Module`` process-wide (see that module); at low priority,
so the server it compiles for keeps answering. ``SPEC`` is a JSON object: the model folder, dtype, latent
size, text-embedding shape and where to write the ``.pt2`` package.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["StepModule", "build_package"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class StepModule(torch.nn.Module):
    """The UNet as ``(sample, timestep, encoder_hidden_states) -> noise prediction``: what the loop calls."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]


def build_package(spec: dict[str, Any]) -> Path:
    """Export the step with a free batch dimension and compile it with AOTInductor (weights frozen).

    With ``spec["backend"] == "openvino"`` convert DeepCache pass ``spec["kind"]`` to OpenVINO IR instead.
    """
    from diffusers import UNet2DConditionModel

    from sdmaker.engine._compiled import MAX_BATCH, MIN_BATCH

    if spec.get("backend") == "openvino":
        from sdmaker.engine._openvino import convert_unet_pass

        # fp32 weights in, whatever the placement: the IR stores fp16 and OpenVINO runs its own precision
        unet = UNet2DConditionModel.from_pretrained(Path(spec["model_dir"]) / "unet", torch_dtype=torch.float32,
                                                    use_safetensors=True)
        return convert_unet_pass(unet, kind=spec["kind"], branch=int(spec["branch"]), height=spec["height"],
                                 width=spec["width"], seq=spec["seq"], out=Path(spec["out"]), batch=MIN_BATCH,
                                 fp16_weights=spec["dtype"] != "float32")
    dtype = _DTYPES[spec["dtype"]]
    # safetensors only: a model whose weights need pickle never gets here with them
    unet = UNet2DConditionModel.from_pretrained(Path(spec["model_dir"]) / "unet", torch_dtype=dtype,
                                                use_safetensors=True).eval().requires_grad_(False)
    step = StepModule(unet)
    b = MIN_BATCH
    sample = torch.zeros(b, spec["channels"], spec["height"], spec["width"], dtype=dtype)
    timestep = torch.full((b,), 999.0)
    embeds = torch.zeros(b, spec["seq"], spec["dim"], dtype=dtype)
    batch = torch.export.Dim("batch", min=MIN_BATCH, max=MAX_BATCH)
    with torch.no_grad():
        exported = torch.export.export(step, (sample, timestep, embeds),
                                       dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), strict=False)
    out = Path(spec["out"])
    # freezing (weights as constants: oneDNN prepacking, folded convs) applies only with grad off: measured,
    # with grad on the package ran no faster than eager
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(exported, package_path=str(out), inductor_configs={"freezing": True})
    return out


def _die_with(parent: int) -> None:
    """Exit when the worker that started us dies, even by kill -9 (Linux ``PR_SET_PDEATHSIG``).

    Minutes of compiling for a worker that is gone would only take cores from the one replacing it.
    """
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call above took effect
        os._exit(1)


def _stay_out_of_the_way() -> None:
    """Run only on CPU time the server leaves idle (``SCHED_IDLE``; ``nice 19`` where that is refused).

    Measured serving SD 2.1 at 256² beside a compile at nice 10: requests took 40 s instead of 5 s, because
    the worker's OpenMP team waits at every barrier for a thread the compiler has displaced.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        os.nice(19)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m sdmaker.engine._compile_child SPEC_JSON [PARENT_PID]", file=sys.stderr)
        return 2
    if len(argv) == 2:
        _die_with(int(argv[1]))
    _stay_out_of_the_way()
    build_package(json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
