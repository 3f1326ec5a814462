"""The web UI in a real browser: Playwright for Python driving Debian's ``chromium``, headless.

``make install`` installs chromium with apt when it runs as root and chromium is missing; elsewhere these
tests skip with a message saying how to get it. Screenshots go to ``build/test-artifacts/`` (the README's
screenshot, ``docs/web-ui.png``, is a copy of ``generate.png`` from a run).

One daemon for the module, serving the built-in ``mini`` (through its managed endpoint ``sdmaker-mini``),
64x64 and a few steps.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import DaemonProcess
from PIL import Image

# slow; the first test also waits for the managed endpoint to load mini (minutes on a busy 2-core machine)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
_CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                  if p and Path(p).exists()), None)
_NO_CHROMIUM = ("chromium is not installed: the browser tests need Debian's chromium (`sudo apt-get install chromium`, "
                "or run `make install` as root, which installs it)")
_REQUEST = {"prompt": "a red ball on green grass", "width": 64, "height": 64, "seed": 1234, "num_inference_steps": 4}
_shared: dict[str, Any] = {}


@pytest.fixture(scope="module")
def ui_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path_factory.mktemp("ui-home"), env={
        "HF_HUB_OFFLINE": "1", "SDMAKER_INVOCATION_TIMEOUT": "900", "SDMAKER_STANDBY_WORKERS": "0"}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    if _CHROMIUM is None:
        pytest.skip(_NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(900_000)
    yield p
    context.close()


def _open(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='true']")


def _fill_request(page: Any, request: dict[str, Any]) -> None:
    for name, value in request.items():
        page.fill(f"#field-{name}", str(value))


def _has_event_stream(url: str) -> bool:
    """Whether this daemon serves ``GET /sdmaker/v1/jobs/{id}/events`` (a route, not the framework's 404)."""
    answer = httpx.get(url + "/sdmaker/v1/jobs/0000000000000000/events", timeout=10)
    return not (answer.status_code == 404 and answer.json().get("detail") == "Not Found")


def test_generate_shows_progress_previews_and_the_same_image_as_the_api(ui_daemon: DaemonProcess, page: Any) -> None:
    _open(page, ui_daemon.url + "/#generate")
    page.select_option("#field-target", "mini")
    page.fill("#field-prompt", _REQUEST["prompt"])
    _fill_request(page, {k: v for k, v in _REQUEST.items() if k != "prompt"})
    # record what the page shows while it runs: every progress text and every preview picture
    page.evaluate("""() => {
        window.__progress = []; window.__previews = 0;
        new MutationObserver(() => window.__progress.push(document.querySelector('#progress-text').textContent))
            .observe(document.querySelector('#progress-text'), {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => { window.__previews += 1; })
            .observe(document.querySelector('#preview'), {attributes: true, attributeFilter: ['src']});
    }""")
    page.get_by_role("button", name="Generate").click()
    streaming = _has_event_stream(ui_daemon.url)
    if streaming:  # a picture of the page while it runs: progress bar, step count, preview
        page.wait_for_function("window.__previews >= 1 || document.querySelector('#results figure')")
        page.screenshot(path=str(ARTIFACTS / "progress.png"), full_page=True)
    figure = page.wait_for_selector("#results figure img")
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)
    image_id = page.eval_on_selector("#results figure", "f => f.dataset.id")
    shown = httpx.get(f"{ui_daemon.url}/sdmaker/v1/gallery/{image_id}.png").content
    assert figure.is_visible()
    # its pixels equal the API's answer to the same request (same endpoint, same seed)
    body = {**_REQUEST, "format": "png"}
    api = ui_daemon.boto("sagemaker-runtime").invoke_endpoint(
        EndpointName="sdmaker-mini", Body=json.dumps(body), ContentType="application/json", Accept="image/png")
    ui_pixels = np.asarray(Image.open(io.BytesIO(shown)).convert("RGB"))
    api_pixels = np.asarray(Image.open(io.BytesIO(api["Body"].read())).convert("RGB"))
    assert ui_pixels.shape == (64, 64, 3) and np.array_equal(ui_pixels, api_pixels)
    _shared["image_id"] = image_id
    steps = {t for t in page.evaluate("window.__progress") if t.startswith("Step ")}
    previews = page.evaluate("window.__previews")
    if not streaming:
        pytest.skip("this daemon has no job event stream (GET /sdmaker/v1/jobs/{id}/events): progress and previews "
                    "cannot show; the final image was checked")
    assert len(steps) >= 2, f"progress updated {len(steps)} time(s): {sorted(steps)}"
    assert previews >= 1, "no preview appeared"


def test_gallery_shows_the_image_after_a_reload(ui_daemon: DaemonProcess, page: Any) -> None:
    image_id = _shared.get("image_id")
    if image_id is None:
        pytest.skip("the generation test did not produce an image")
    _open(page, ui_daemon.url + "/#gallery")
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    figure = page.wait_for_selector(f"#gallery figure[data-id='{image_id}'] img")
    assert figure.is_visible()
    assert page.eval_on_selector(f"#gallery figure[data-id='{image_id}'] img", "i => i.naturalWidth") == 64
    caption = page.inner_text(f"#gallery figure[data-id='{image_id}'] figcaption")
    assert _REQUEST["prompt"] in caption and "seed 1234" in caption  # the recipe, read from the PNG
    page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)


def test_an_invalid_height_shows_the_field_error(ui_daemon: DaemonProcess, page: Any) -> None:
    _open(page, ui_daemon.url + "/#generate")
    page.select_option("#field-target", "mini")
    page.fill("#field-prompt", "anything")
    page.fill("#field-height", "100")
    page.focus("#field-height")
    page.keyboard.press("Enter")  # the keyboard submits the form too
    error = page.wait_for_selector("#err-height:not(:empty)")
    assert "multiple of 8" in error.inner_text()
    assert page.get_attribute("#field-height", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "field-height"  # focus moves to the bad field
    page.screenshot(path=str(ARTIFACTS / "field-error.png"), full_page=True)


def _circle_png(path: Path, size: int, colour: tuple[int, int, int] = (220, 30, 30)) -> bytes:
    """A ``size``x``size`` PNG: a circle on the left of a white square (what mini draws), written to ``path``."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((size // 8, size // 3, size // 2, size * 2 // 3 + size // 8), fill=colour)
    image.save(path, format="PNG")
    return path.read_bytes()


def test_img2img_through_the_file_picker(ui_daemon: DaemonProcess, page: Any, tmp_path: Path) -> None:
    """A PNG chosen with the image field's file input is read in the browser into the request's base64: the
    page shows its thumbnail and size, and the image-to-image result arrives with the file's digest."""
    png = _circle_png(tmp_path / "red-circle.png", 64)
    _open(page, ui_daemon.url + "/#generate")
    page.select_option("#field-target", "mini")
    page.fill("#field-prompt", "a blue circle on the left")
    _fill_request(page, {"num_inference_steps": 4, "seed": 7, "strength": 0.7})
    assert page.get_by_label("image (PNG, JPEG or WebP file)", exact=True).count() == 1  # the picker has its label
    page.set_input_files("#field-image-file", str(tmp_path / "red-circle.png"))
    page.wait_for_function("document.querySelector('#size-image').textContent.includes('64 × 64')")
    assert "red-circle.png" in page.inner_text("#size-image")
    assert page.eval_on_selector("#thumb-image", "i => i.complete && i.naturalWidth") == 64
    assert page.is_visible("#thumb-image") and page.get_attribute("#thumb-image", "alt")
    assert page.input_value("#field-image") == base64.b64encode(png).decode()  # the advanced box holds the same
    page.get_by_role("button", name="Generate").click()  # (a full-page screenshot before a click can misplace it)
    page.wait_for_selector("#results figure img, #generate-error:not(:empty), #generate-form .field-error:not(:empty)")
    errors = page.eval_on_selector_all("#generate-error, #generate-form .field-error", "ns => ns.map(n => n.textContent)")
    assert not any(errors), errors
    page.wait_for_selector("#results figure img")
    page.screenshot(path=str(ARTIFACTS / "img2img-picker.png"), full_page=True)
    image_id = page.eval_on_selector("#results figure", "f => f.dataset.id")
    result = Image.open(io.BytesIO(httpx.get(f"{ui_daemon.url}/sdmaker/v1/gallery/{image_id}.png").content))
    recipe = json.loads(result.info["sdmaker"])
    assert result.size == (64, 64)  # the output size is the input image's
    assert recipe["inputs"] == {"image_sha256": hashlib.sha256(png).hexdigest()}  # the file's bytes, unchanged
    assert recipe["request"]["strength"] == 0.7 and recipe["request"]["prompt"] == "a blue circle on the left"


def test_a_mismatched_mask_shows_the_inline_error_and_sends_nothing(ui_daemon: DaemonProcess, page: Any,
                                                                   tmp_path: Path) -> None:
    image_png = _circle_png(tmp_path / "image.png", 64)
    _circle_png(tmp_path / "mask.png", 32, (255, 255, 255))
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" and "/ui/generate" in r.url else None)
    _open(page, ui_daemon.url + "/#generate")
    page.select_option("#field-target", "mini")
    page.fill("#field-prompt", "a yellow star on the right")
    _fill_request(page, {"num_inference_steps": 2, "seed": 1})
    # a file that is not an image is refused where it was chosen, naming the field
    page.set_input_files("#field-mask_image-file", files=[
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
    assert "mask_image" in page.inner_text("#err-mask_image") and "PNG, JPEG or WebP" in page.inner_text("#err-mask_image")
    assert page.input_value("#field-mask_image") == ""
    page.evaluate("""b64 => {  // the image dropped onto its field (drag and drop), the mask chosen with the picker
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.querySelector("#drop-image").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    }""", base64.b64encode(image_png).decode())
    page.wait_for_function("document.querySelector('#size-image').textContent.includes('dropped.png: 64 × 64')")
    page.set_input_files("#field-mask_image-file", str(tmp_path / "mask.png"))
    page.wait_for_function("document.querySelector('#size-mask_image').textContent.includes('32 × 32')")
    assert page.inner_text("#err-mask_image") == ""  # a good file clears the old error
    page.get_by_role("button", name="Generate").click()
    error = page.wait_for_selector("#err-mask_image:not(:empty)")
    text = error.inner_text()
    assert "mask_image" in text and "32x32" in text and "64x64" in text
    assert page.get_attribute("#field-mask_image-file", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "field-mask_image-file"  # focus moves to the bad field
    page.screenshot(path=str(ARTIFACTS / "mask-error.png"), full_page=True)
    assert sent == [] and page.inner_text("#progress-text") == ""  # checked before sending: nothing can follow


def _fake_mlflow_run(root: Path) -> None:
    """One finished run in MLflow's file-store layout (what ``sdmaker train`` writes through mlflow-skinny)."""
    exp, run = root / "42", root / "42" / "r1"
    for sub in ("metrics", "params", "artifacts/samples"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    (exp / "meta.yaml").write_text("experiment_id: '42'\nname: sdmaker-train-unet\nlifecycle_stage: active\n")
    (run / "meta.yaml").write_text("run_id: r1\nrun_name: mini-unet\nstatus: 3\nstart_time: 1700000000000\n"
                                   "lifecycle_stage: active\n")
    (run / "metrics" / "loss").write_text("".join(f"1700000000000 {1 / (i + 1)} {i * 10}\n" for i in range(30)))
    (run / "metrics" / "lr").write_text("".join(f"1700000000000 {0.001 * (1 - i / 30)} {i * 10}\n" for i in range(30)))
    (run / "metrics" / "eval_overall").write_text("1700000000000 0.994 290\n")
    (run / "params" / "lr").write_text("0.001")
    Image.new("RGB", (64, 32), (30, 160, 60)).save(run / "artifacts" / "samples" / "step-000290.png")


def test_endpoints_page_creates_and_deletes_an_endpoint(ui_daemon: DaemonProcess, page: Any) -> None:
    """Through SageMaker's control plane, as boto3 would; a model folder that does not exist fails at once
    (no worker to wait for), and the failure reason shows in the table."""
    _open(page, ui_daemon.url + "/#endpoints")
    page.fill("#create-name", "bad name!")
    page.get_by_role("button", name="Create").click()
    assert "letters, digits" in page.inner_text("#err-create-name")
    assert page.get_attribute("#create-name", "aria-invalid") == "true"
    page.fill("#create-name", "ui-made")
    page.fill("#create-model", "/nonexistent/model-folder")
    page.get_by_role("button", name="Create").click()
    page.wait_for_selector("#endpoints-table th:text-is('ui-made')")
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_function("[...document.querySelectorAll('#endpoints-table tr')].some("
                           "r => r.textContent.includes('ui-made') && r.textContent.includes('Failed'))")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete ui-made").click()
    page.wait_for_function("![...document.querySelectorAll('#endpoints-table th')].some(t => t.textContent === 'ui-made')")
    names = [e["name"] for e in httpx.get(ui_daemon.url + "/sdmaker/v1/endpoints").json()["endpoints"]]
    assert "ui-made" not in names


def test_endpoints_models_and_runs_pages(ui_daemon: DaemonProcess, page: Any) -> None:
    _fake_mlflow_run(ui_daemon.home / "mlruns")
    _open(page, ui_daemon.url + "/#models")
    page.wait_for_selector("#models-table th:text-is('mini')")
    page.keyboard.press("Tab")  # keyboard users land on the skip link first
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.get_by_role("link", name="Runs").click()
    page.wait_for_selector("#runs-table th:text-is('mini-unet')")
    page.wait_for_selector("#run-compare svg.plot polyline")
    assert page.locator("#run-compare svg.plot").count() >= 2  # loss and learning rate
    assert "eval_overall" in page.inner_text("#run-compare") and "0.994" in page.inner_text("#run-compare")
    page.wait_for_selector("#run-compare .samples img")
    page.screenshot(path=str(ARTIFACTS / "runs.png"), full_page=True)
    if _shared.get("image_id") is None:
        pytest.skip("no endpoint was created by the generation test")
    page.get_by_role("link", name="Endpoints").click()
    page.wait_for_selector("#endpoints-table th:text-is('sdmaker-mini')")
    page.get_by_role("button", name="Logs of sdmaker-mini").click()
    page.wait_for_function("document.querySelector('#endpoint-logs').textContent.includes('in service')")
    row = page.inner_text("#endpoints-table tbody tr")
    assert "InService" in row and "1 / 1" in row
    page.screenshot(path=str(ARTIFACTS / "endpoints.png"), full_page=True)
