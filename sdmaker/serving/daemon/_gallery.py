"""The web UI's gallery: every image generated from the UI, kept under ``$SDMAKER_HOME/gallery``.

Each image is a PNG written by the engine, so it carries its own recipe (the ``sdmaker`` iTXt chunk, see
:mod:`sdmaker.engine._images`); the gallery reads the recipe back from the file, never from a database,
so a PNG copied elsewhere regenerates the same way. Beside it, ``<id>.json`` records what the PNG
cannot: the endpoint that served it and when. Files are written to a temporary name and renamed, so a
listing never sees half an image.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from sdmaker.errors import InvalidRequestError

__all__ = ["RECIPE_KEY", "Gallery"]

#: The PNG text chunk holding the recipe (the engine's ``RECIPE_KEY``; not imported: the engine imports torch).
RECIPE_KEY = "sdmaker"
_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_png_recipe(data: bytes) -> dict[str, Any] | None:
    """The sdmaker recipe embedded in PNG ``data``; ``None`` when there is none (or it is not JSON)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            text = img.info.get(RECIPE_KEY)
    except (OSError, ValueError):
        return None
    if not isinstance(text, str):
        return None
    try:
        recipe = json.loads(text)
    except ValueError:
        return None
    return recipe if isinstance(recipe, dict) else None


class Gallery:
    """Images under ``root``: ``<id>.png`` (with its recipe) and ``<id>.json`` (endpoint, job, time)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, image: bytes, *, endpoint: str, job_id: str, seed: int | None) -> dict[str, Any]:
        """Store one PNG; returns its listing entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        image_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
        meta = {"endpoint": endpoint, "job_id": job_id, "seed": seed, "created": time.time()}
        _write(self.root / f"{image_id}.png", image)
        _write(self.root / f"{image_id}.json", json.dumps(meta).encode())
        return self._entry(image_id, image, meta)

    def path(self, image_id: str) -> Path:
        if not _ID.match(image_id):
            raise InvalidRequestError("not a gallery image id", field="id", value=image_id[:80])
        return self.root / f"{image_id}.png"

    def _entry(self, image_id: str, image: bytes, meta: dict[str, Any]) -> dict[str, Any]:
        return {"id": image_id, "url": f"/sdmaker/v1/gallery/{image_id}.png", "recipe": read_png_recipe(image),
                **meta}

    def list(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` images, newest first, each with the recipe read from its PNG."""
        if not self.root.is_dir():
            return []
        ids = sorted((p.stem for p in self.root.glob("*.png") if _ID.match(p.stem)), reverse=True)[:limit]
        out = []
        for image_id in ids:
            try:
                image = (self.root / f"{image_id}.png").read_bytes()
            except OSError:
                continue
            try:
                meta = json.loads((self.root / f"{image_id}.json").read_text())
            except (OSError, ValueError):
                meta = {}
            out.append(self._entry(image_id, image, meta if isinstance(meta, dict) else {}))
        return out

    def delete(self, image_id: str) -> bool:
        path = self.path(image_id)
        found = path.exists()
        for p in (path, path.with_suffix(".json")):
            p.unlink(missing_ok=True)
        return found
