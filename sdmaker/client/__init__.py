"""Python client for the sdmaker daemon (no torch import: it starts fast and runs anywhere).

``Client`` manages endpoints and invokes them with the shared request schema; ``Predictor`` mirrors
the SageMaker SDK's ``predict(data)`` / ``delete_endpoint()``. Errors are :mod:`sdmaker.errors` classes.
"""

from sdmaker.client._client import Client, Generation, InvokeResult
from sdmaker.client._predictor import Predictor

__all__ = ["Client", "Generation", "InvokeResult", "Predictor"]
