"""Endpoints on a Ray cluster (``sdmaker up --ray``): each variant a Ray Serve application whose replicas run
the local worker on the nodes Ray picks. The daemon keeps its role (control plane, runtime API, state,
auth, metrics); see :mod:`._pool` for how SageMaker's knobs map onto Serve's.

Importing this package does not import Ray: only a daemon started with ``--ray`` does.
"""

from sdmaker.serving.daemon.ray._artifacts import ARTIFACT_ROUTE, FetchedModel, node_model, tar_stream
from sdmaker.serving.daemon.ray._cluster import RayCluster, check_ray_address
from sdmaker.serving.daemon.ray._pool import PoolShape, RayPool, ReplicaView
from sdmaker.serving.daemon.ray._resources import (
    INSTANCE_RESOURCES,
    ReplicaResources,
    load_instance_table,
    missing_resource,
    replica_resources,
)

__all__ = ["ARTIFACT_ROUTE", "INSTANCE_RESOURCES", "FetchedModel", "PoolShape", "RayCluster", "RayPool",
           "ReplicaResources", "ReplicaView", "check_ray_address", "load_instance_table", "missing_resource",
           "node_model", "replica_resources", "tar_stream"]
