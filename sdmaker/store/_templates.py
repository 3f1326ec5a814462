"""Files ``sdmaker model package`` adds under ``code/`` when the model and ``--code`` lack them.

Kept as strings (not as .py files in the package) so no tool ever imports the handler by accident,
and wheels carry them without package-data rules.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["DEFAULT_INFERENCE_PY", "default_requirements_txt"]

DEFAULT_INFERENCE_PY = '''# code/inference.py written by `sdmaker model package` when no --code folder provides one.
# The seed article's handler (SageMaker Hugging Face toolkit hooks model_fn / predict_fn), with the
# device picked at run time: CUDA + fp16 when a GPU is there, CPU + fp32 otherwise. Plain diffusers,
# so it runs unchanged in SageMaker's Hugging Face container and in `sdmaker` endpoints.
import base64
from io import BytesIO

import torch
from diffusers import StableDiffusionPipeline


def model_fn(model_dir):
    cuda = torch.cuda.is_available()
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, torch_dtype=torch.float16 if cuda else torch.float32, safety_checker=None,
        requires_safety_checker=False, use_safetensors=True,
    )
    return pipe.to("cuda" if cuda else "cpu")


def predict_fn(data, pipe):
    prompt = data.pop("prompt", "")
    generated_images = pipe(
        prompt,
        negative_prompt=data.pop("negative_prompt", None),
        height=data.pop("height", 512),
        width=data.pop("width", 512),
        num_inference_steps=data.pop("num_inference_steps", 50),
        guidance_scale=data.pop("guidance_scale", 7.5),
        num_images_per_prompt=data.pop("num_images_per_prompt", 1),
    )["images"]
    encoded_images = []
    for image in generated_images:
        buffered = BytesIO()
        image.save(buffered, format="JPEG")
        encoded_images.append(base64.b64encode(buffered.getvalue()).decode())
    return {"generated_images": encoded_images}
'''


def default_requirements_txt() -> str:
    """Pins of the libraries the default handler imports, at the versions installed here."""
    lines = []
    for dist in ("diffusers", "transformers", "safetensors"):
        try:
            lines.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(dist)
    return "\n".join(lines) + "\n"
