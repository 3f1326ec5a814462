"""Training runs for the web UI's Runs page, read straight from MLflow's file store (``$SDMAKER_HOME/mlruns``).

The layout is MLflow's own (``<experiment>/<run>/{meta.yaml, params/, metrics/, artifacts/}``; a metric
file has one ``<timestamp ms> <value> <step>`` line per logged point), read with plain file operations:
importing mlflow in the daemon would cost seconds and pull in its server-side dependencies, which
``mlflow-skinny`` does not have anyway. Reading is read-only and tolerant: a run being written, or a
file MLflow's next version adds, is skipped rather than failing the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sdmaker.errors import InvalidRequestError

__all__ = ["RunStore"]

_STATUS = {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}
_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
#: Points per metric curve sent to the browser (longer series are thinned evenly, the last point kept).
_MAX_POINTS = 400
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _meta(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _series(path: Path) -> list[list[float]]:
    points: list[list[float]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return points
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            try:
                points.append([int(parts[2]), float(parts[1])])
            except ValueError:
                continue
    points.sort(key=lambda p: p[0])
    if len(points) > _MAX_POINTS:
        stride = len(points) / _MAX_POINTS
        points = [points[int(i * stride)] for i in range(_MAX_POINTS - 1)] + [points[-1]]
    return points


class RunStore:
    """The MLflow file store at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _experiments(self) -> list[tuple[Path, dict[str, Any]]]:
        if not self.root.is_dir():
            return []
        out = []
        for exp in sorted(self.root.iterdir()):
            if exp.is_dir() and _ID.match(exp.name) and (exp / "meta.yaml").exists():
                out.append((exp, _meta(exp / "meta.yaml")))
        return out

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first: name, experiment, status, times, params and each metric's last value."""
        out: list[dict[str, Any]] = []
        for exp, exp_meta in self._experiments():
            for run in exp.iterdir():
                if not (run.is_dir() and _ID.match(run.name) and (run / "meta.yaml").exists()):
                    continue
                meta = _meta(run / "meta.yaml")
                if meta.get("lifecycle_stage") == "deleted":
                    continue
                last = {}
                for metric in sorted((run / "metrics").glob("*")) if (run / "metrics").is_dir() else []:
                    series = _series(metric)
                    if series:
                        last[metric.name] = series[-1][1]
                out.append({"experiment_id": exp.name, "experiment": exp_meta.get("name"), "run_id": run.name,
                            "name": meta.get("run_name") or run.name,
                            "status": _STATUS.get(int(meta.get("status") or 0), str(meta.get("status"))),
                            "start_time": meta.get("start_time"), "end_time": meta.get("end_time"),
                            "params": self._params(run), "last_metrics": last})
        out.sort(key=lambda r: int(r.get("start_time") or 0), reverse=True)
        return out

    def _run_dir(self, experiment_id: str, run_id: str) -> Path:
        if not (_ID.match(experiment_id) and _ID.match(run_id)):
            raise InvalidRequestError("not a run id", field="run_id", value=run_id[:80])
        path = self.root / experiment_id / run_id
        if not (path / "meta.yaml").exists():
            from sdmaker.errors import ModelNotFoundError

            raise ModelNotFoundError(f"no run {run_id} in experiment {experiment_id}", run=run_id)
        return path

    @staticmethod
    def _params(run: Path) -> dict[str, str]:
        params = {}
        if (run / "params").is_dir():
            for p in sorted((run / "params").iterdir()):
                if p.is_file():
                    try:
                        params[p.name] = p.read_text()[:500]
                    except OSError:
                        continue
        return params

    def run(self, experiment_id: str, run_id: str) -> dict[str, Any]:
        """One run in full: params, every metric's curve (step, value), and its image artifacts."""
        path = self._run_dir(experiment_id, run_id)
        meta = _meta(path / "meta.yaml")
        metrics = {m.name: _series(m) for m in sorted((path / "metrics").glob("*"))} \
            if (path / "metrics").is_dir() else {}
        artifacts = path / "artifacts"
        images = sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*")
                        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES) if artifacts.is_dir() else []
        return {"experiment_id": experiment_id, "run_id": run_id, "name": meta.get("run_name") or run_id,
                "status": _STATUS.get(int(meta.get("status") or 0), str(meta.get("status"))),
                "start_time": meta.get("start_time"), "end_time": meta.get("end_time"),
                "params": self._params(path), "metrics": metrics, "images": images}

    def artifact(self, experiment_id: str, run_id: str, rel: str) -> Path:
        """The file ``rel`` under the run's artifacts (never outside them)."""
        base = (self._run_dir(experiment_id, run_id) / "artifacts").resolve()
        target = (base / rel).resolve()
        if base not in target.parents or not target.is_file():
            from sdmaker.errors import ModelNotFoundError

            raise ModelNotFoundError(f"no artifact {rel!r} in run {run_id}", run=run_id)
        return target
