"""``Predictor``: the SageMaker SDK's predictor shape (``predict(data)`` / ``delete_endpoint()``) over :class:`Client`.

Code written against ``sagemaker.huggingface.HuggingFacePredictor`` (JSON in, JSON out) ports by
changing one import, without AWS credentials or botocore.
"""

from __future__ import annotations

from typing import Any

from sdmaker.client._client import Client

__all__ = ["Predictor"]


class Predictor:
    """JSON predictor bound to one endpoint.

    Example::

        predictor = Predictor("mini-endpoint")
        res = predictor.predict({"prompt": ["a bird"], "height": 64, "width": 64})
        images = res["generated_images"]      # base64 JPEG strings, as in the seed
    """

    def __init__(self, endpoint_name: str, *, client: Client | None = None) -> None:
        self.endpoint_name = endpoint_name
        self._owns_client = client is None
        self.client = client or Client()

    def predict(self, data: dict[str, Any], *, custom_attributes: str | None = None) -> Any:
        """Send ``data`` as JSON and return the decoded JSON answer."""
        return self.client.invoke(self.endpoint_name, data, custom_attributes=custom_attributes).json()

    def delete_endpoint(self) -> None:
        """Delete the endpoint, its config and its model (like the SDK's delete_endpoint + delete_model)."""
        self.client.delete_endpoint(self.endpoint_name)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
