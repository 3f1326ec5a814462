"""The default handler serves ``loras``: through the daemon's validated path too, wrong bases answered 400."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

from sdmaker.config import load_settings
from sdmaker.files import tree_digest
from sdmaker.serving._protocol import WorkerConfig, trusts_validation
from sdmaker.serving.container._handler import HandlerService
from sdmaker.serving.daemon._invoke_api import validate_default_body
from sdmaker.store import Store


def test_the_default_handler_applies_loras(sdmaker_home: Path, sd1_dir: Path, lora_files: dict[str, Path]) -> None:
    store = Store(load_settings().store_dir)
    store.import_lora(lora_files["a"], name="a", base="sd1", base_digest=tree_digest(sd1_dir), base_unet=sd1_dir / "unet")
    store.import_lora(lora_files["b"], name="elsewhere", base="other", base_digest="f" * 64)
    handler = HandlerService(sd1_dir, device="cpu", dtype="fp32")
    handler.load()
    daemon = WorkerConfig(model_dir=sd1_dir, port=0, trust_daemon_validation=True)
    handler.validated_by = lambda headers: trusts_validation(daemon, headers)
    body = {"inputs": "a fox", "parameters": {"num_inference_steps": 2, "seed": 7, "height": 64, "width": 64,
                                              "format": "png", "loras": [{"name": "a", "scale": 0.5}]}}
    canonical = validate_default_body(json.dumps(body).encode(), "application/json")  # what the daemon forwards
    assert canonical is not None and json.loads(canonical)["loras"] == [{"name": "a", "scale": 0.5}]
    reply = handler.handle(canonical, {"content-type": "application/json", "x-sdmaker-validated": "1"})
    assert reply.status == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["adapters"] == [{"name": "a", "scale": 0.5, "digest": store.get("a").lora.sha256}]  # type: ignore[union-attr]
    png = Image.open(io.BytesIO(base64.b64decode(answer["generated_images"][0])))
    assert json.loads(png.info["sdmaker"])["adapters"][0]["name"] == "a"
    wrong = {**body, "parameters": {**body["parameters"], "loras": [{"name": "elsewhere"}]}}
    reply = handler.handle(json.dumps(wrong).encode(), {"content-type": "application/json"})
    error = json.loads(reply.body)
    assert reply.status == 400 and "f" * 64 in error["message"] and tree_digest(sd1_dir) in error["message"]
    assert error["field"] == "loras"
