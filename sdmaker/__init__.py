"""sdmaker: a self-hosted, offline Stable Diffusion platform that speaks SageMaker's APIs.

Import what you need from the sub-packages: ``sdmaker.engine`` (load and generate), ``sdmaker.store``
(models and artifacts), ``sdmaker.serving`` (model server, endpoints), ``sdmaker.client`` (Python SDK).
This top-level module stays import-light (no torch) so that the client and CLI start fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
