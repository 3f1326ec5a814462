"""The web UI's JSON routes and static files, in process (no worker is started): schema, field errors,
gallery (recipe read from the PNG), MLflow runs, and the control plane still answering ``POST /``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from sdmaker.config import Settings
from sdmaker.schema import GenerateRequest
from sdmaker.serving.daemon import create_app
from sdmaker.serving.daemon._gallery import Gallery
from sdmaker.serving.daemon._generate import managed_endpoint_name


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def client(home: Path):  # type: ignore[no-untyped-def]
    app = create_app(Settings(home=home, standby_workers=0), host="127.0.0.1", port=8765)
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        yield c


def _png(recipe: dict | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if recipe is not None:
        info.add_itxt("sdmaker", json.dumps(recipe))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_page_and_assets_ship_in_the_package_and_the_control_plane_still_answers(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/ui/app.js"' in page.text and 'lang="en"' in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert client.get("/ui/../_app.py").status_code == 404
    assert client.get("/ui/nothing.js").status_code == 404
    listed = client.post("/", json={}, headers={"X-Amz-Target": "SageMaker.ListEndpoints",
                                                "Content-Type": "application/x-amz-json-1.1"})
    assert listed.status_code == 200 and listed.json()["Endpoints"] == []


def test_schema_lists_every_request_field_with_its_limits(client: TestClient) -> None:
    fields = {f["name"]: f for f in client.get("/sdmaker/v1/schema").json()["fields"]}
    assert list(fields) == list(GenerateRequest.model_fields)
    assert fields["height"]["minimum"] == 64 and fields["height"]["multiple_of"] == 8
    assert fields["prompt"]["required"] is True and "ddim" in fields["scheduler"]["choices"]


def test_generate_answers_a_bad_field_with_its_name(client: TestClient) -> None:
    bad = client.post("/sdmaker/v1/ui/generate", json={"target": "mini", "request": {"prompt": "x", "height": 100}})
    assert bad.status_code == 400 and bad.json()["field"] == "height" and "multiple of 8" in bad.json()["message"]
    jpeg = client.post("/sdmaker/v1/ui/generate", json={"target": "mini", "request": {"prompt": "x", "format": "jpeg"}})
    assert jpeg.status_code == 400 and jpeg.json()["field"] == "format"
    unknown = client.post("/sdmaker/v1/ui/generate", json={"target": "no-such", "request": {"prompt": "x"}})
    assert unknown.status_code == 404 and unknown.json()["field"] == "target"
    assert client.get("/sdmaker/v1/ui/generate/../x").status_code == 404


def test_gallery_lists_images_with_the_recipe_read_from_the_png(client: TestClient, home: Path) -> None:
    recipe = {"model": "mini", "request": {"prompt": "a boat", "seed": 9, "width": 8, "height": 8}}
    entry = Gallery(home / "gallery").add(_png(recipe), endpoint="sdmaker-mini", job_id="j1", seed=9)
    Gallery(home / "gallery").add(_png(None), endpoint="x", job_id="j2", seed=None)
    items = client.get("/sdmaker/v1/gallery").json()["items"]
    assert len(items) == 2
    mine = next(i for i in items if i["id"] == entry["id"])
    assert mine["recipe"] == recipe and mine["endpoint"] == "sdmaker-mini"
    image = client.get(mine["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert client.get("/sdmaker/v1/gallery/../../etc.png").status_code in (400, 404)
    assert not list((home / "gallery").glob(".*tmp"))  # written through temp files, none left
    assert client.delete(f"/sdmaker/v1/gallery/{entry['id']}").status_code == 200
    assert len(client.get("/sdmaker/v1/gallery").json()["items"]) == 1


def _fake_run(root: Path, exp: str, run: str, name: str, losses: list[float]) -> None:
    (root / exp).mkdir(parents=True, exist_ok=True)
    (root / exp / "meta.yaml").write_text(f"experiment_id: '{exp}'\nname: sdmaker-train\nlifecycle_stage: active\n")
    r = root / exp / run
    for sub in ("metrics", "params", "artifacts/samples", "tags"):
        (r / sub).mkdir(parents=True, exist_ok=True)
    (r / "meta.yaml").write_text(f"run_id: {run}\nrun_name: {name}\nstatus: 3\nstart_time: 1700000000000\n"
                                 "lifecycle_stage: active\n")
    # MLflow appends "<timestamp> <value> <step>" lines; out of order on purpose
    lines = [f"{1700000000000 + i} {v} {i * 10}" for i, v in enumerate(losses)]
    (r / "metrics" / "loss").write_text("\n".join(reversed(lines)) + "\n")
    (r / "metrics" / "lr").write_text("1700000000000 0.001 0\n1700000000001 0.0005 10\n")
    (r / "metrics" / "fid").write_text("1700000000009 12.5 20\n")
    (r / "params" / "lr").write_text("0.001")
    (r / "artifacts" / "samples" / "step-000020.png").write_bytes(_png(None))


def test_runs_come_from_the_mlflow_file_store(client: TestClient, home: Path) -> None:
    _fake_run(home / "mlruns", "123", "abc", "mini-unet", [1.0, 0.5, 0.25])
    runs = client.get("/sdmaker/v1/runs").json()["runs"]
    assert [r["name"] for r in runs] == ["mini-unet"]
    assert runs[0]["status"] == "FINISHED" and runs[0]["last_metrics"]["loss"] == 0.25
    run = client.get("/sdmaker/v1/runs/123/abc").json()
    assert run["metrics"]["loss"] == [[0, 1.0], [10, 0.5], [20, 0.25]]
    assert run["metrics"]["fid"] == [[20, 12.5]] and run["params"] == {"lr": "0.001"}
    assert run["images"] == ["samples/step-000020.png"]
    grid = client.get("/sdmaker/v1/runs/123/abc/artifacts/samples/step-000020.png")
    assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")
    assert client.get("/sdmaker/v1/runs/123/abc/artifacts/../meta.yaml").status_code == 404
    assert client.get("/sdmaker/v1/runs/123/nope").status_code == 404


def test_models_lists_the_builtin_before_its_first_use(client: TestClient) -> None:
    names = [m["name"] for m in client.get("/sdmaker/v1/models").json()["models"]]
    assert "mini" in names


def test_managed_endpoint_names_are_valid_and_distinct() -> None:
    assert managed_endpoint_name("mini") == "sdmaker-mini"
    a, b = managed_endpoint_name("my_model.v2"), managed_endpoint_name("my-model-v2")
    assert a != b and a.startswith("sdmaker-my-model-v2-")
    long = managed_endpoint_name("x" * 200)
    assert len(long) <= 63
