"""The web UI at the daemon's root URL, and the JSON routes only it needs.

Pages (one static page, :file:`ui/index.html`, plain HTML/JS/CSS shipped as package data; nothing is built):
Generate, Gallery, Endpoints, Models and Runs. The page reads sdmaker's JSON routes:

* ``GET /sdmaker/v1/schema`` -- every request field with its limits (:func:`sdmaker.schema.request_fields`),
  so the form shows every field the schema has, and nothing else (the input images ``image`` and
  ``mask_image`` as file pickers, read into base64 in the browser, with a mask-size check before sending);
* ``POST /sdmaker/v1/ui/generate`` ``{"target": endpoint or store model, "request": {...}}`` -- validates
  (a 400 names the bad field, which the page shows next to it), answers ``202 {"job_id"}`` at once and
  runs the request in the background through :func:`._generate.generate` (admission, queue, batching);
  the page follows ``GET /sdmaker/v1/jobs/{job_id}/events`` (SSE: steps, previews) and fetches
  ``GET /sdmaker/v1/ui/generate/{job_id}`` (a long poll) for the images;
* ``GET /sdmaker/v1/gallery``, ``GET|DELETE /sdmaker/v1/gallery/{id}[.png]`` -- images generated here,
  persisted under ``$SDMAKER_HOME/gallery`` with their recipes (:mod:`._gallery`);
* ``GET /sdmaker/v1/models`` -- the store's models; ``GET /sdmaker/v1/runs[/{exp}/{run}[/artifacts/{path}]]``
  -- MLflow training runs (:mod:`._runs`);
* endpoints: the existing ``/sdmaker/v1/endpoints`` routes, and SageMaker's own control plane
  (``POST /`` with ``X-Amz-Target``) to create and delete them.

Authentication: the page itself (``GET /`` and ``/ui/*``: static files with no data in them) loads
without credentials so that it can ask for them; every data route above is guarded like the rest of the
API (off loopback: ``Authorization: Bearer <SDMAKER_API_TOKEN>``, which the page sends from what the user
typed, kept in the tab's ``sessionStorage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from sdmaker.config import Settings
from sdmaker.errors import InvalidRequestError, ModelNotFoundError, SdmakerError
from sdmaker.schema import GenerateRequest, request_fields, request_from_payload
from sdmaker.serving._http import read_body
from sdmaker.serving.daemon._endpoints import EndpointManager
from sdmaker.serving.daemon._gallery import Gallery
from sdmaker.serving.daemon._generate import check_job_id, generate, is_target, new_job_id, resolve_target
from sdmaker.serving.daemon._metrics import DaemonMetrics
from sdmaker.serving.daemon._runs import RunStore

__all__ = ["STATIC_DIR", "UIJobs", "add_ui_routes", "is_public_path"]

logger = logging.getLogger(__name__)

#: The page's files, shipped inside the package.
STATIC_DIR = Path(__file__).parent / "ui"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
#: How long one ``GET /sdmaker/v1/ui/generate/{id}`` waits for its job before answering "running".
_LONG_POLL_S = 20.0
#: Finished UI jobs whose results are kept for the page to fetch.
_KEEP_JOBS = 200


def is_public_path(path: str, method: str) -> bool:
    """The page's static files: served without credentials (they hold no data)."""
    return method in ("GET", "HEAD") and (path == "/" or path.startswith("/ui/"))


@dataclass
class _UIJob:
    task: asyncio.Task[list[dict[str, Any]]]
    target: str


@dataclass
class UIJobs:
    """The web UI's generations: job id -> its background task (the newest :data:`_KEEP_JOBS`)."""

    jobs: dict[str, _UIJob] = field(default_factory=dict)

    def add(self, job_id: str, job: _UIJob) -> None:
        self.jobs[job_id] = job
        for old in list(self.jobs)[:-_KEEP_JOBS]:
            if self.jobs[old].task.done():
                del self.jobs[old]


def _error(exc: SdmakerError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers={"X-Sdmaker-Error-Code": exc.code})


def _with_ui_defaults(payload: dict[str, Any]) -> GenerateRequest:
    """The page's request: PNG (the recipe lives in it) and cheap previews unless the page chose otherwise."""
    data = dict(payload)
    if "format" in data and data["format"] != "png":
        raise InvalidRequestError("the gallery keeps PNGs (they carry the recipe): format must be png",
                                  field="format", value=data["format"], allowed="png")
    data["format"] = "png"
    if "preview" in GenerateRequest.model_fields and "preview" not in data:
        data["preview"] = "approx"
    return request_from_payload(data)


async def _run_ui_job(request: Request, target: str, gen_request: GenerateRequest, job_id: str
                      ) -> list[dict[str, Any]]:
    settings: Settings = request.state.settings
    manager: EndpointManager = request.state.manager
    metrics: DaemonMetrics = request.state.metrics
    try:
        rt = await resolve_target(manager, settings, target)
    except SdmakerError as exc:
        manager.events.publish(job_id, "error", {"status": exc.http_status, "code": exc.code, "message": exc.message})
        raise
    result = await generate(manager, metrics, rt, gen_request, job_id=job_id)
    gallery = Gallery(settings.gallery_dir)
    items = []
    for i, image in enumerate(result.images):
        seed = result.seeds[i] if i < len(result.seeds) else None
        items.append(await asyncio.to_thread(gallery.add, image, endpoint=rt.name, job_id=job_id, seed=seed))
    return items


def add_ui_routes(app: FastAPI) -> None:
    """Register the page and its JSON routes on the daemon ``app``."""
    ui_jobs = UIJobs()

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type=_STATIC_TYPES[".html"],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/ui/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or not path.is_file() or path.suffix not in _STATIC_TYPES:
            return JSONResponse({"error": "NotFound", "message": f"no file {name!r}"}, status_code=404)
        return FileResponse(path, media_type=_STATIC_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})

    @app.get("/sdmaker/v1/schema")
    async def schema() -> dict[str, Any]:
        fields = []
        for spec in request_fields():
            fields.append({"name": spec.name, "type": spec.type.__name__, "required": spec.required,
                           "default": spec.default, "description": spec.description, "multiple": spec.multiple,
                           "choices": list(spec.choices) if spec.choices else None, "minimum": spec.minimum,
                           "maximum": spec.maximum, "multiple_of": spec.multiple_of, "allowed": spec.allowed})
        return {"fields": fields}

    @app.post("/sdmaker/v1/ui/generate")
    async def ui_generate(request: Request) -> Response:
        settings: Settings = request.state.settings
        manager: EndpointManager = request.state.manager
        try:
            raw = await read_body(request, settings.max_body_bytes)
            try:
                body = json.loads(raw or b"null")
            except (ValueError, RecursionError):
                raise InvalidRequestError("request body is not valid JSON", field=None) from None
            if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
                raise InvalidRequestError('send {"target": ..., "request": {...}}', field="request")
            target = body.get("target")
            if not isinstance(target, str) or not target:
                raise InvalidRequestError("choose an endpoint or a model", field="target", value=target)
            gen_request = _with_ui_defaults(body["request"])
            if not await is_target(manager, settings, target):
                raise ModelNotFoundError(f"no endpoint or store model named {target!r}", field="target",
                                         model=target)
        except SdmakerError as exc:
            return _error(exc)
        job_id = new_job_id()
        manager.events.open(job_id)
        task = asyncio.ensure_future(_run_ui_job(request, target, gen_request, job_id))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)  # read: never "unretrieved"
        ui_jobs.add(job_id, _UIJob(task=task, target=target))
        return JSONResponse({"job_id": job_id, "events": f"/sdmaker/v1/jobs/{job_id}/events"}, status_code=202)

    @app.get("/sdmaker/v1/ui/generate/{job_id}")
    async def ui_result(job_id: str) -> Response:
        try:
            job = ui_jobs.jobs.get(check_job_id(job_id))
            if job is None:
                raise ModelNotFoundError(f"no UI job {job_id}", field="job_id")
        except SdmakerError as exc:
            return _error(exc)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(job.task), _LONG_POLL_S)
        if not job.task.done():
            return JSONResponse({"state": "running", "job_id": job_id})
        failure = job.task.exception()
        if failure is not None:
            err = failure if isinstance(failure, SdmakerError) else SdmakerError("generation failed")
            return JSONResponse({"state": "error", "job_id": job_id, "error": err.to_dict(),
                                 "status": err.http_status})
        return JSONResponse({"state": "done", "job_id": job_id, "target": job.target, "items": job.task.result()})

    @app.get("/sdmaker/v1/gallery")
    async def gallery_list(request: Request, limit: int = 200) -> dict[str, Any]:
        settings: Settings = request.state.settings
        items = await asyncio.to_thread(Gallery(settings.gallery_dir).list, max(1, min(limit, 1000)))
        return {"items": items}

    @app.get("/sdmaker/v1/gallery/{image_id}.png")
    async def gallery_image(request: Request, image_id: str) -> Response:
        settings: Settings = request.state.settings
        try:
            path = Gallery(settings.gallery_dir).path(image_id)
        except SdmakerError as exc:
            return _error(exc)
        if not path.is_file():
            return _error(ModelNotFoundError(f"no gallery image {image_id}", field="id"))
        return FileResponse(path, media_type="image/png",
                            headers={"Content-Disposition": f'inline; filename="{image_id}.png"'})

    @app.delete("/sdmaker/v1/gallery/{image_id}")
    async def gallery_delete(request: Request, image_id: str) -> Response:
        settings: Settings = request.state.settings
        try:
            found = Gallery(settings.gallery_dir).delete(image_id)
        except SdmakerError as exc:
            return _error(exc)
        return JSONResponse({"deleted": found}, status_code=200 if found else 404)

    @app.get("/sdmaker/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        settings: Settings = request.state.settings
        return {"models": await asyncio.to_thread(_store_models, settings)}

    @app.get("/sdmaker/v1/runs")
    async def runs(request: Request) -> dict[str, Any]:
        settings: Settings = request.state.settings
        return {"runs": await asyncio.to_thread(RunStore(settings.mlflow_dir).runs)}

    @app.get("/sdmaker/v1/runs/{experiment_id}/{run_id}")
    async def run(request: Request, experiment_id: str, run_id: str) -> Response:
        settings: Settings = request.state.settings
        try:
            return JSONResponse(await asyncio.to_thread(RunStore(settings.mlflow_dir).run, experiment_id, run_id))
        except SdmakerError as exc:
            return _error(exc)

    @app.get("/sdmaker/v1/runs/{experiment_id}/{run_id}/artifacts/{rel:path}")
    async def run_artifact(request: Request, experiment_id: str, run_id: str, rel: str) -> Response:
        settings: Settings = request.state.settings
        try:
            path = RunStore(settings.mlflow_dir).artifact(experiment_id, run_id, rel)
        except SdmakerError as exc:
            return _error(exc)
        return FileResponse(path)


def _store_models(settings: Settings) -> list[dict[str, Any]]:
    from sdmaker.models import BUILTIN_NAMES
    from sdmaker.store import Store

    out = []
    names = set()
    with contextlib.suppress(OSError, SdmakerError):
        for m in Store(settings.store_dir).list():
            names.add(m.name)
            out.append({"name": m.name, "digest": m.digest, "size": m.total_size, "created": m.created.isoformat(),
                        "source": m.source, "defaults": m.defaults, "prediction_type": m.prediction_type,
                        "architecture": m.architecture.model_dump(mode="json"), "builtin": False})
    for name in BUILTIN_NAMES:
        if name not in names:
            out.append({"name": name, "builtin": True, "digest": None, "size": None, "created": None,
                        "source": f"builtin:{name} (imported on first use)", "defaults": {}})
    return out
