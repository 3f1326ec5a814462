"""The daemon's connection to a Ray cluster (``sdmaker up --ray ADDRESS`` / ``SDMAKER_RAY_ADDRESS``).

:func:`check_ray_address` runs in ``sdmaker up`` before anything starts, so an unreachable address is a
one-line error instead of Ray's endless reconnect messages. :class:`RayCluster` is the daemon's side:
it connects as a driver, starts Ray Serve without its HTTP proxy (the daemon is the front door), names
the Serve applications of this daemon, and holds what replicas need to fetch models from the daemon
(its URL and a token only they get).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import ConfigError, WorkerStartError
from sdmaker.serving._http import is_loopback
from sdmaker.serving.daemon._variant import VariantPlan
from sdmaker.serving.daemon.ray._pool import RayPool
from sdmaker.serving.daemon.ray._resources import (
    ReplicaResources,
    load_instance_table,
    missing_resource,
    replica_resources,
)

__all__ = ["RayCluster", "check_ray_address"]

logger = logging.getLogger(__name__)


def _resolve(address: str) -> str:
    """``host:port`` of the cluster's GCS; ``auto`` asks Ray (``RAY_ADDRESS``, else the last local cluster)."""
    address = address.strip()
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            return str(canonicalize_bootstrap_address_or_die("auto"))
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(f"--ray auto found no running Ray cluster on this machine ({exc}); start one with "
                              "`ray start --head` or pass its address", field="ray", value=address) from None
    if address.startswith("ray://"):
        raise ConfigError("Ray Client addresses (ray://) are not supported: run `sdmaker up` on a node of the "
                          "cluster and pass the GCS address (host:6379)", field="ray", value=address)
    return address


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"Ray address {address!r} is not host:port (or auto)", field="ray", value=address)
    return host.strip("[]"), int(port)


def check_ray_address(address: str, timeout_s: float = 3.0) -> str:
    """The cluster's ``host:port`` if something listens there; a one-line :class:`ConfigError` otherwise."""
    resolved = _resolve(address)
    host, port = _split(resolved)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot reach the Ray cluster at {resolved} ({reason}): start it with `ray start --head` "
                          "or fix --ray / SDMAKER_RAY_ADDRESS", field="ray", value=address) from None
    return resolved


class RayCluster:
    """One daemon's use of one Ray cluster."""

    def __init__(self, settings: Settings) -> None:
        assert settings.ray_address
        self.settings = settings
        self.address = settings.ray_address
        self.table = load_instance_table(settings.ray_instance_types)  # bad overrides fail `sdmaker up`
        #: a bearer token that only lets its holder download the models this daemon serves on Ray
        self.artifact_token = secrets.token_urlsafe(32)
        #: digest -> model folder: what replicas may download (models of endpoints on Ray, nothing else)
        self.exports: dict[str, Path] = {}
        #: prefix of this daemon's Serve applications (two daemons may share a cluster)
        self.prefix = "sdm-" + hashlib.sha256(str(settings.home.resolve()).encode()).hexdigest()[:8]
        self.head_url = settings.ray_head_url or ""
        self._connected = False

    def connect(self) -> None:
        """Join the cluster as a driver and start Serve (blocking: call it off the event loop)."""
        resolved = check_ray_address(self.address)
        host, _ = _split(resolved)
        import ray

        if is_loopback(host):
            # a cluster bound to 127.0.0.1: Ray would otherwise dial this machine's outward address for it
            import ray._private.ray_constants as ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        options: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if is_loopback(host) else {}
        ray.init(address=resolved, namespace="sdmaker", logging_level=logging.WARNING, log_to_driver=True,
                 configure_logging=False, **options)
        from ray import serve

        serve.start(proxy_location="Disabled")
        self._connected = True
        # a daemon that was killed left its applications running: they hold replicas nobody can reach
        for stale in [app for app in serve.status().applications if app.startswith(self.prefix + "-")]:
            logger.warning("removing Ray Serve application %s left by a previous run of this daemon", stale)
            serve.delete(stale)
        if not self.head_url:
            bind = self.settings.daemon_host
            if bind in ("0.0.0.0", "::", ""):
                bind = ray.util.get_node_ip_address()
            self.head_url = f"http://{bind}:{self.settings.daemon_port}"
        logger.info("connected to the Ray cluster at %s (%s); replicas fetch models from %s", resolved,
                    self.describe_resources(), self.head_url)

    def close(self) -> None:
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False

    def nodes(self) -> list[Mapping[str, float]]:
        """Total resources of every alive node."""
        import ray

        return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]

    def describe_resources(self) -> str:
        total: dict[str, float] = {}
        for node in self.nodes():
            for key in ("CPU", "GPU"):
                total[key] = total.get(key, 0.0) + node.get(key, 0.0)
        return f"{len(self.nodes())} node(s), " + ", ".join(f"{v:g} {k}" for k, v in total.items())

    def resources_for(self, instance_type: str | None) -> ReplicaResources:
        return replica_resources(instance_type, self.table)

    def unplaceable(self, need: ReplicaResources) -> str | None:
        """Why no node can hold a replica needing ``need`` (None: one can)."""
        return missing_resource(need, self.nodes())

    def app_name(self, endpoint: str, generation: int) -> str:
        return f"{self.prefix}-{endpoint}-v{generation}"

    def token_ok(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries :attr:`artifact_token`."""
        if not header or not header.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.artifact_token.encode())

    def pool_for(self, endpoint: str, generation: int, plan: VariantPlan, *, container: Mapping[str, Any],
                 model_ref: str, model_dir: Path, digest: str | None) -> RayPool:
        """The Serve application for one variant (not started); exports its model to the replicas.

        Raises:
            WorkerStartError: no node of the cluster can hold one replica (e.g. GPUs on a CPU-only cluster).
        """
        from sdmaker.store import is_s3_uri

        if not digest:
            raise WorkerStartError(f"model {model_ref} has no content digest; endpoints on Ray need a stored model")
        need = self.resources_for(plan.instance_type)
        why = self.unplaceable(need)
        if why:
            raise WorkerStartError(f"instance type {plan.instance_type or 'local'} cannot run on this Ray cluster: "
                                   f"{why} ({self.describe_resources()}; see SDMAKER_RAY_INSTANCE_TYPES)")
        self.exports[digest] = model_dir
        model_env = {str(k): str(v) for k, v in (container.get("Environment") or {}).items()}
        spec = {"digest": digest, "s3_uri": model_ref if is_s3_uri(model_ref) else None, "head_url": self.head_url,
                "token": self.artifact_token, "cache_dir": None, "model_env": model_env, "threads": need.threads,
                "model_name": plan.config.model_name, "device": "auto" if need.num_gpus > 0 else "cpu",
                "dtype": plan.config.dtype, "max_batch": plan.config.max_batch,
                "max_body_bytes": plan.config.max_body_bytes, "startup_timeout_s": plan.startup_timeout_s,
                "tag": f"{endpoint}-v{generation}"}
        return RayPool(app=self.app_name(endpoint, generation), spec=spec, resources=need, count=plan.count,
                       max_batch=plan.config.max_batch, max_queue=self.settings.max_queue if plan.max_queue is None
                       else plan.max_queue, startup_timeout_s=plan.startup_timeout_s)

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "head_url": self.head_url, "applications_prefix": self.prefix}
