"""Experiment tracking with MLflow's local file store under ``$SDMAKER_HOME/mlruns``.

Only ``mlflow-skinny`` is needed (tracking client + file store). A resumed run reopens the same MLflow
run (its id is kept in the checkpoint), so curves continue instead of starting a second run.
Tracking failures are logged and never stop training.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from sdmaker.config import allow_mlflow_file_store

__all__ = ["Tracker", "tracking_uri"]

logger = logging.getLogger(__name__)


def tracking_uri(mlflow_dir: Path) -> str:
    return Path(mlflow_dir).resolve().as_uri()


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = str(value)[:500]


class Tracker:
    """A thin MLflow wrapper; ``enabled=False`` (or mlflow missing) makes every call a no-op."""

    def __init__(self, mlflow_dir: Path | None, experiment: str, *, enabled: bool = True) -> None:
        self.run_id: str | None = None
        self._client: Any = None
        self._experiment = experiment
        if not enabled or mlflow_dir is None:
            return
        try:
            allow_mlflow_file_store()
            from mlflow.tracking import MlflowClient

            Path(mlflow_dir).mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=tracking_uri(mlflow_dir))
        except Exception as exc:  # noqa: BLE001 - tracking is optional
            logger.warning("MLflow tracking disabled: %s", exc)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            logger.warning("MLflow %s failed: %s", what, exc)
            return None

    def start(self, run_name: str, params: dict[str, Any], *, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str | None:
        """Open (or reopen ``run_id``) a run and log ``params`` and the full config as an artifact."""
        if self._client is None:
            return None

        def _start() -> str:
            client = self._client
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
                return run_id
            exp = client.get_experiment_by_name(self._experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(self._experiment)
            run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
            flat: dict[str, str] = {}
            _flat("", params, flat)
            for key, value in flat.items():
                client.log_param(run.info.run_id, key, value)
            client.log_text(run.info.run_id, json.dumps(params, indent=2, default=str), "config.json")
            return str(run.info.run_id)

        self.run_id = self._guard("start", _start)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        for key, value in metrics.items():
            if value is None or not math.isfinite(float(value)):
                continue
            self._guard("log_metric", self._client.log_metric, self.run_id, key, float(value), step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is not None:
            self._guard("log_artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self.run_id is not None:
            self._guard("set_tag", self._client.set_tag, self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._guard("end", self._client.set_terminated, self.run_id, status)
