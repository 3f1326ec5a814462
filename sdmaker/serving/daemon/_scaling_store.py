"""Autoscaling's durable state, in the daemon's SQLite: scalable targets, scaling policies, scaling activities,
and each endpoint's desired instance count (so a restarted daemon brings an endpoint back at the count it was
scaled to, not at its ``InitialInstanceCount``).

Only one scalable dimension exists (``sagemaker:variant:DesiredInstanceCount``), so rows are keyed by
``ResourceId`` (``endpoint/NAME/variant/VARIANT``). Policies keep the request's
``TargetTrackingScalingPolicyConfiguration`` verbatim, so ``DescribeScalingPolicies`` answers with what the
caller sent.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sdmaker.serving.daemon._scaling import (
    DEFAULT_SCALE_IN_COOLDOWN_S,
    DEFAULT_SCALE_OUT_COOLDOWN_S,
    ScalingTarget,
    TrackingPolicy,
)
from sdmaker.serving.daemon._state import StateDB

__all__ = ["ActivityRecord", "PolicyRecord", "ScalingStore", "TargetRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scalable_targets (
    resource_id TEXT PRIMARY KEY, min_capacity INTEGER NOT NULL, max_capacity INTEGER NOT NULL,
    role_arn TEXT NOT NULL, suspended TEXT NOT NULL, arn TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS scaling_policies (
    resource_id TEXT NOT NULL, name TEXT NOT NULL, arn TEXT NOT NULL, config TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (resource_id, name));
CREATE TABLE IF NOT EXISTS scaling_activities (
    id TEXT PRIMARY KEY, resource_id TEXT NOT NULL, description TEXT NOT NULL, cause TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, status TEXT NOT NULL, message TEXT);
CREATE INDEX IF NOT EXISTS scaling_activities_by_resource ON scaling_activities (resource_id, started);
CREATE TABLE IF NOT EXISTS instance_counts (
    endpoint TEXT PRIMARY KEY, variant TEXT NOT NULL, desired INTEGER NOT NULL);
"""
#: Activities kept per resource (the oldest are dropped): enough history, bounded storage.
MAX_ACTIVITIES = 200


@dataclass(frozen=True)
class TargetRecord:
    resource_id: str
    min_capacity: int
    max_capacity: int
    role_arn: str
    suspended: dict[str, bool]
    arn: str
    created: float


@dataclass(frozen=True)
class PolicyRecord:
    resource_id: str
    name: str
    arn: str
    #: ``TargetTrackingScalingPolicyConfiguration`` as the caller sent it (validated)
    config: dict[str, Any]
    created: float

    def tracking(self) -> TrackingPolicy:
        spec = self.config.get("PredefinedMetricSpecification") or {}
        return TrackingPolicy(
            name=self.name, metric=spec["PredefinedMetricType"], target_value=float(self.config["TargetValue"]),
            scale_out_cooldown_s=float(self.config.get("ScaleOutCooldown", DEFAULT_SCALE_OUT_COOLDOWN_S)),
            scale_in_cooldown_s=float(self.config.get("ScaleInCooldown", DEFAULT_SCALE_IN_COOLDOWN_S)),
            disable_scale_in=bool(self.config.get("DisableScaleIn", False)))


@dataclass(frozen=True)
class ActivityRecord:
    id: str
    resource_id: str
    description: str
    cause: str
    started: float
    ended: float | None
    status: str
    message: str | None


class ScalingStore:
    """The autoscaling tables of one :class:`~._state.StateDB`."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        db.add_schema(_SCHEMA)

    # -- scalable targets --------------------------------------------------------------------------------

    def put_target(self, rec: TargetRecord) -> None:
        self.db.run("INSERT OR REPLACE INTO scalable_targets (resource_id, min_capacity, max_capacity, role_arn, "
                    "suspended, arn, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (rec.resource_id, rec.min_capacity, rec.max_capacity, rec.role_arn, json.dumps(rec.suspended),
                     rec.arn, rec.created))

    def target(self, resource_id: str) -> TargetRecord | None:
        rows = self.targets([resource_id])
        return rows[0] if rows else None

    def targets(self, resource_ids: list[str] | None = None) -> list[TargetRecord]:
        rows = self.db.run("SELECT resource_id, min_capacity, max_capacity, role_arn, suspended, arn, created FROM "
                           "scalable_targets ORDER BY created")
        out = [TargetRecord(r[0], int(r[1]), int(r[2]), r[3], json.loads(r[4]), r[5], float(r[6])) for r in rows]
        return [t for t in out if resource_ids is None or t.resource_id in resource_ids]

    def delete_target(self, resource_id: str) -> bool:
        """Remove the target and its policies (as AWS's DeregisterScalableTarget does)."""
        found = bool(self.db.run("SELECT 1 FROM scalable_targets WHERE resource_id = ?", (resource_id,)))
        self.db.run("DELETE FROM scaling_policies WHERE resource_id = ?", (resource_id,))
        self.db.run("DELETE FROM scalable_targets WHERE resource_id = ?", (resource_id,))
        return found

    def scaling_target(self, resource_id: str) -> ScalingTarget | None:
        """The target and its policies, as the backends take them."""
        rec = self.target(resource_id)
        if rec is None:
            return None
        return ScalingTarget(rec.min_capacity, rec.max_capacity,
                             policies=tuple(p.tracking() for p in self.policies(resource_id)),
                             scale_out_suspended=bool(rec.suspended.get("DynamicScalingOutSuspended")),
                             scale_in_suspended=bool(rec.suspended.get("DynamicScalingInSuspended")))

    # -- policies ----------------------------------------------------------------------------------------

    def put_policy(self, resource_id: str, name: str, arn: str, config: dict[str, Any]) -> PolicyRecord:
        """Create or replace a policy; a replaced policy keeps its ARN and creation time."""
        old = [p for p in self.policies(resource_id) if p.name == name]
        rec = PolicyRecord(resource_id, name, old[0].arn if old else arn, config,
                           old[0].created if old else time.time())
        self.db.run("INSERT OR REPLACE INTO scaling_policies (resource_id, name, arn, config, created) "
                    "VALUES (?, ?, ?, ?, ?)", (rec.resource_id, rec.name, rec.arn, json.dumps(config), rec.created))
        return rec

    def policies(self, resource_id: str | None = None) -> list[PolicyRecord]:
        rows = self.db.run("SELECT resource_id, name, arn, config, created FROM scaling_policies ORDER BY created")
        out = [PolicyRecord(r[0], r[1], r[2], json.loads(r[3]), float(r[4])) for r in rows]
        return [p for p in out if resource_id is None or p.resource_id == resource_id]

    def delete_policy(self, resource_id: str, name: str) -> bool:
        found = bool(self.db.run("SELECT 1 FROM scaling_policies WHERE resource_id = ? AND name = ?",
                                 (resource_id, name)))
        self.db.run("DELETE FROM scaling_policies WHERE resource_id = ? AND name = ?", (resource_id, name))
        return found

    # -- activities --------------------------------------------------------------------------------------

    def start_activity(self, resource_id: str, description: str, cause: str) -> str:
        activity = str(uuid.uuid4())
        self.db.run("INSERT INTO scaling_activities (id, resource_id, description, cause, started, status) "
                    "VALUES (?, ?, ?, ?, ?, 'InProgress')", (activity, resource_id, description, cause, time.time()))
        self.db.run("DELETE FROM scaling_activities WHERE resource_id = ? AND id NOT IN (SELECT id FROM "
                    "scaling_activities WHERE resource_id = ? ORDER BY started DESC LIMIT ?)",
                    (resource_id, resource_id, MAX_ACTIVITIES))
        return activity

    def end_activity(self, activity: str, status: str, message: str) -> None:
        self.db.run("UPDATE scaling_activities SET status = ?, message = ?, ended = ? WHERE id = ?",
                    (status, message[:2048], time.time(), activity))

    def fail_unfinished(self) -> None:
        """Activities a stopped daemon left ``InProgress`` ended with it."""
        self.db.run("UPDATE scaling_activities SET status = 'Failed', message = 'The daemon stopped before this "
                    "activity ended; the endpoint restarted at its last stored instance count.', ended = ? "
                    "WHERE status IN ('InProgress', 'Pending')", (time.time(),))

    def activities(self, resource_id: str | None = None) -> list[ActivityRecord]:
        """Newest first."""
        rows = self.db.run("SELECT id, resource_id, description, cause, started, ended, status, message FROM "
                           "scaling_activities ORDER BY started DESC")
        out = [ActivityRecord(r[0], r[1], r[2], r[3], float(r[4]), None if r[5] is None else float(r[5]), r[6], r[7])
               for r in rows]
        return [a for a in out if resource_id is None or a.resource_id == resource_id]

    # -- desired instance counts ------------------------------------------------------------------------

    def set_count(self, endpoint: str, variant: str, desired: int) -> None:
        self.db.run("INSERT OR REPLACE INTO instance_counts (endpoint, variant, desired) VALUES (?, ?, ?)",
                    (endpoint, variant, desired))

    def count(self, endpoint: str) -> int | None:
        rows = self.db.run("SELECT desired FROM instance_counts WHERE endpoint = ?", (endpoint,))
        return int(rows[0][0]) if rows else None

    def forget_count(self, endpoint: str) -> None:
        self.db.run("DELETE FROM instance_counts WHERE endpoint = ?", (endpoint,))
