"""The seed article's steps 8-9, as written there, pointed at sdmaker by the environment only.

Run after `eval "$(sdmaker env)"` with `sdmaker up` running and model.tar.gz uploaded to S3 (or a local
path / store name as model_data). Usage: python examples/seed/deploy_and_invoke.py s3://bucket/model.tar.gz
"""

import base64
import sys
from io import BytesIO

from PIL import Image
from sagemaker.huggingface.model import HuggingFaceModel

s3_model_uri = sys.argv[1]
role = "arn:aws:iam::111122223333:role/sagemaker-execution-role"  # offline: a plain ARN string
SD_MODEL = "mini"

huggingface_model = HuggingFaceModel(
    model_data=s3_model_uri,
    role=role,
    transformers_version="4.26",
    pytorch_version="1.13",
    py_version="py39",
)
predictor = huggingface_model.deploy(
    initial_instance_count=1,
    instance_type="ml.g4dn.xlarge",
    endpoint_name=f"{SD_MODEL}-endpoint",
)

data = {
    "prompt": ["a large red circle on a white background", "a small blue star in the top left corner"],
    "height": 64,
    "width": 64,
    "num_images_per_prompt": 1,
}
res = predictor.predict(data=data)
for i, b64 in enumerate(res["generated_images"]):
    image = Image.open(BytesIO(base64.b64decode(b64)))
    image.save(f"seed-image-{i}.jpg")
    print(f"seed-image-{i}.jpg", image.size)
predictor.delete_endpoint()
