# The seed article's code/inference.py, unchanged except for the device line ("cuda" -> "cpu") and the
# dtype (fp16 -> fp32), because this machine has no GPU. On a CUDA machine use the seed's original lines.
import base64
from io import BytesIO

import torch
from diffusers import StableDiffusionPipeline


def model_fn(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe = pipe.to("cpu")
    return pipe


def predict_fn(data, pipe):
    # get prompt & parameters
    prompt = data.pop("prompt", "")
    # set valid HP for stable diffusion
    height = data.pop("height", 512)
    width = data.pop("width", 512)
    num_inference_steps = data.pop("num_inference_steps", 50)
    guidance_scale = data.pop("guidance_scale", 7.5)
    num_images_per_prompt = data.pop("num_images_per_prompt", 1)
    # run generation with parameters
    generated_images = pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images_per_prompt,
    )["images"]
    # create response
    encoded_images = []
    for image in generated_images:
        buffered = BytesIO()
        image.save(buffered, format="JPEG")
        encoded_images.append(base64.b64encode(buffered.getvalue()).decode())
    # create response
    return {"generated_images": encoded_images}
