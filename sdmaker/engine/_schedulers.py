"""Scheduler names of the request schema mapped onto diffusers scheduler classes.

Every scheduler is built with ``from_config(pipeline.scheduler.config)`` so that the model's own
training schedule (betas, ``prediction_type`` epsilon or v-prediction, timestep spacing) carries over.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from sdmaker.errors import InvalidRequestError
from sdmaker.schema import SCHEDULERS

__all__ = ["make_scheduler", "scheduler_name_of"]

_TABLE: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}
assert set(_TABLE) == set(SCHEDULERS), "schema and engine scheduler lists diverged"


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler ``name`` configured like ``base_config`` (schedulers are stateful: one per run)."""
    try:
        cls, overrides = _TABLE[name]
    except KeyError:
        raise InvalidRequestError(
            f"scheduler={name!r} is not known (allowed: {', '.join(SCHEDULERS)})",
            field="scheduler", value=name, allowed=", ".join(SCHEDULERS),
        ) from None
    extra = dict(overrides)
    if "clip_sample" not in base_config:
        # DDIM/DDPM default to clipping the predicted x0 to [-1, 1], which is right for pixel-space models and
        # wrong for latents (SD's own DDIM/PNDM configs set clip_sample false). A config from another
        # scheduler class (the built-in mini ships DPM-Solver) lacks the key, so DDIM must not get the default.
        extra["clip_sample"] = False
    return cls.from_config(base_config, **extra)


def scheduler_name_of(scheduler: Any) -> str | None:
    """The schema name of a diffusers scheduler instance, if it is one of ours."""
    for name, (cls, _) in _TABLE.items():
        if type(scheduler) is cls:
            return name
    return None
