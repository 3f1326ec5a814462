"""sdmaker: a self-hosted, offline Stable Diffusion platform that speaks SageMaker's APIs.

Import what you need from the sub-packages: ``sdmaker.engine`` (load and generate), ``sdmaker.store``
(models and artifacts), ``sdmaker.serving`` (model server, endpoints), ``sdmaker.client`` (Python SDK).
This top-level module stays import-light (no torch) so that the client and CLI start fast.
"""

from typing import Any

from sdmaker.config import openmp_spin_default as _openmp_spin_default

_openmp_spin_default()  # before anything imports torch: see its docstring

__version__ = "0.1.0"

__all__ = ["Client", "Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    """``sdmaker.Client`` / ``sdmaker.Predictor``, imported on first use (the client never imports torch)."""
    if name in ("Client", "Predictor"):
        from sdmaker import client

        return getattr(client, name)
    raise AttributeError(f"module 'sdmaker' has no attribute {name!r}")
