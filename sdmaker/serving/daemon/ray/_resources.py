"""What one replica of an endpoint variant asks Ray for: ``InstanceType`` -> ``ray_actor_options``.

One table, :data:`INSTANCE_RESOURCES`, maps SageMaker instance types to the CPUs, GPUs and memory a
replica reserves on a Ray node (one SageMaker instance = one replica). Types it does not list follow
their family: accelerated families (``ml.g*``, ``ml.p*``, ``ml.inf*``, ``ml.trn*``) take 1 GPU and 4
CPUs, every other type 1 CPU. ``SDMAKER_RAY_INSTANCE_TYPES`` overrides or extends the table: a JSON
object, inline or in a file, ``{"ml.g5.xlarge": {"num_cpus": 2, "num_gpus": 1, "memory_gb": 12}}``.

Why a table: Ray places replicas by reserved resources, so a replica must reserve what its model
needs on that hardware, not what the machine that runs the daemon has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmaker.errors import ConfigError

__all__ = ["INSTANCE_RESOURCES", "ReplicaResources", "load_instance_table", "missing_resource", "replica_resources"]

_ACCELERATED = ("ml.g", "ml.p", "ml.inf", "ml.trn")

#: (CPUs, GPUs, memory GiB) each SageMaker instance type reserves for its replica; see the module docstring.
INSTANCE_RESOURCES: dict[str, tuple[float, float, float]] = {
    "local": (1, 0, 0), "local_gpu": (1, 1, 0),
    "ml.t2.medium": (2, 0, 4), "ml.t3.medium": (2, 0, 4),
    "ml.m5.large": (2, 0, 8), "ml.m5.xlarge": (4, 0, 16), "ml.m5.2xlarge": (8, 0, 32), "ml.m5.4xlarge": (16, 0, 64),
    "ml.c5.large": (2, 0, 4), "ml.c5.xlarge": (4, 0, 8), "ml.c5.2xlarge": (8, 0, 16), "ml.c5.4xlarge": (16, 0, 32),
    "ml.g4dn.xlarge": (4, 1, 16), "ml.g4dn.2xlarge": (8, 1, 32), "ml.g4dn.4xlarge": (16, 1, 64),
    "ml.g4dn.12xlarge": (48, 4, 192),
    "ml.g5.xlarge": (4, 1, 16), "ml.g5.2xlarge": (8, 1, 32), "ml.g5.4xlarge": (16, 1, 64), "ml.g5.12xlarge": (48, 4, 192),
    "ml.g6.xlarge": (4, 1, 16), "ml.g6.2xlarge": (8, 1, 32), "ml.g6e.xlarge": (4, 1, 32),
    "ml.p3.2xlarge": (8, 1, 61), "ml.p3.8xlarge": (32, 4, 244), "ml.p4d.24xlarge": (96, 8, 1152),
}


@dataclass(frozen=True)
class ReplicaResources:
    """The Ray reservation of one replica."""

    num_cpus: float
    num_gpus: float = 0.0
    memory_gb: float = 0.0

    def actor_options(self) -> dict[str, Any]:
        """Ray Serve ``ray_actor_options`` (memory in bytes; 0 reserves none)."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb > 0:
            out["memory"] = int(self.memory_gb * 1024**3)
        return out

    @property
    def threads(self) -> int:
        """Torch threads the replica's worker runs with: its reserved CPUs (at least 1)."""
        return max(1, int(self.num_cpus))


def _entry(itype: str, raw: Any) -> ReplicaResources:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"SDMAKER_RAY_INSTANCE_TYPES: the entry of {itype!r} must be an object with num_cpus, "
                          "num_gpus, memory_gb", field="SDMAKER_RAY_INSTANCE_TYPES", value=itype)
    unknown = set(raw) - {"num_cpus", "num_gpus", "memory_gb"}
    if unknown:
        raise ConfigError(f"SDMAKER_RAY_INSTANCE_TYPES: {itype!r} has unknown key(s) {sorted(unknown)}; allowed: "
                          "num_cpus, num_gpus, memory_gb", field="SDMAKER_RAY_INSTANCE_TYPES", value=itype)
    values = {}
    for key in ("num_cpus", "num_gpus", "memory_gb"):
        value = raw.get(key, 1 if key == "num_cpus" else 0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"SDMAKER_RAY_INSTANCE_TYPES: {itype}.{key}={value!r} must be a number >= 0",
                              field="SDMAKER_RAY_INSTANCE_TYPES", value=value)
        values[key] = float(value)
    return ReplicaResources(values["num_cpus"], values["num_gpus"], values["memory_gb"])


def load_instance_table(override: str | None) -> dict[str, ReplicaResources]:
    """The table with ``override`` (``SDMAKER_RAY_INSTANCE_TYPES``: inline JSON or a JSON file) applied."""
    table = {k: ReplicaResources(*v) for k, v in INSTANCE_RESOURCES.items()}
    if not override or not override.strip():
        return table
    text = override.strip()
    if not text.startswith(("{", "[")):
        try:
            text = Path(text).expanduser().read_text()
        except OSError as exc:
            raise ConfigError(f"SDMAKER_RAY_INSTANCE_TYPES={override!r} is neither a JSON object nor a readable "
                              f"file ({exc.strerror})", field="SDMAKER_RAY_INSTANCE_TYPES", value=override) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"SDMAKER_RAY_INSTANCE_TYPES is not valid JSON: {exc}", field="SDMAKER_RAY_INSTANCE_TYPES",
                          value=override) from None
    if not isinstance(data, dict):
        raise ConfigError("SDMAKER_RAY_INSTANCE_TYPES must be a JSON object {instance type: resources}",
                          field="SDMAKER_RAY_INSTANCE_TYPES", value=override)
    table.update({str(k).lower(): _entry(str(k), v) for k, v in data.items()})
    return table


def replica_resources(instance_type: str | None, table: Mapping[str, ReplicaResources]) -> ReplicaResources:
    """What a replica of ``instance_type`` reserves: the table's entry, else its family's default."""
    itype = (instance_type or "local").lower()
    if itype in table:
        return table[itype]
    if itype.startswith(_ACCELERATED):
        return ReplicaResources(4, 1, 0)
    return ReplicaResources(1, 0, 0)


def missing_resource(need: ReplicaResources, nodes: Iterable[Mapping[str, float]]) -> str | None:
    """Why no node of the cluster can ever hold one replica (None when one can): names the resource.

    ``nodes`` are the alive nodes' total resources (``ray.nodes()[i]["Resources"]``). Checked before deploying,
    so a variant that needs GPUs on a CPU-only cluster fails at once instead of waiting forever in Creating.
    """
    nodes = list(nodes)
    wants = {"GPU": need.num_gpus, "CPU": need.num_cpus, "memory": need.memory_gb * 1024**3}
    if any(all(node.get(k, 0.0) >= v for k, v in wants.items() if v > 0) for node in nodes):
        return None
    for key, amount in wants.items():
        if amount > 0 and not any(node.get(key, 0.0) >= amount for node in nodes):
            best = max((node.get(key, 0.0) for node in nodes), default=0.0)
            shown = (lambda x: f"{x / 1024**3:.1f} GiB") if key == "memory" else (lambda x: f"{x:g}")
            return (f"each replica needs {shown(amount)} {key}; no node of the Ray cluster has that much (largest: "
                    f"{shown(best)}{'; the cluster has no GPU' if key == 'GPU' and best == 0 else ''})")
    return "no single node of the Ray cluster has all of " + ", ".join(f"{k} {v:g}" for k, v in wants.items() if v)
