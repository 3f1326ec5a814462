"""The Ray backend's pure parts, without a cluster: the instance type table, placement checks, the model
archive a replica downloads, and the address check of ``sdmaker up --ray``."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from sdmaker.errors import ConfigError
from sdmaker.files import tree_digest
from sdmaker.serving.daemon.ray import (
    ReplicaResources,
    check_ray_address,
    load_instance_table,
    missing_resource,
    replica_resources,
    tar_stream,
)


def test_instance_types_map_to_actor_options_and_can_be_overridden(tmp_path: Path) -> None:
    table = load_instance_table(None)
    assert replica_resources("ml.g4dn.xlarge", table).actor_options() == {"num_cpus": 4.0, "num_gpus": 1.0,
                                                                         "memory": 16 * 1024**3}
    assert replica_resources("ml.g99.mega", table) == ReplicaResources(4, 1, 0)  # an accelerated family
    assert replica_resources("ml.x9.odd", table) == ReplicaResources(1, 0, 0)
    inline = load_instance_table('{"ml.g4dn.xlarge": {"num_cpus": 2, "num_gpus": 0.5}}')
    assert replica_resources("ML.G4DN.XLARGE", inline) == ReplicaResources(2, 0.5, 0)
    path = tmp_path / "types.json"
    path.write_text(json.dumps({"ml.custom": {"num_cpus": 3, "memory_gb": 2}}))
    assert replica_resources("ml.custom", load_instance_table(str(path))) == ReplicaResources(3, 0, 2)


@pytest.mark.parametrize(("override", "words"), [
    ('{"ml.m5.large": {"num_cpus": -1}}', "ml.m5.large.num_cpus=-1"),
    ('{"ml.m5.large": {"gpus": 1}}', "unknown key(s) ['gpus']"),
    ('{"ml.m5.large": 4}', "must be an object"),
    ("[1]", "must be a JSON object"),
    ("{nope", "not valid JSON"),
    ("/no/such/file.json", "neither a JSON object nor a readable file"),
])
def test_a_bad_instance_table_override_names_the_problem(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_instance_table(override)
    assert words in err.value.message and err.value.fields.get("field") == "SDMAKER_RAY_INSTANCE_TYPES"


def test_missing_resource_names_what_no_node_has() -> None:
    cpu_nodes = [{"CPU": 1.0, "memory": 8 * 1024**3}, {"CPU": 1.0, "memory": 8 * 1024**3}]
    why = missing_resource(ReplicaResources(1, 1, 0), cpu_nodes)
    assert why is not None and "GPU" in why and "the cluster has no GPU" in why
    assert missing_resource(ReplicaResources(1, 0, 0), cpu_nodes) is None
    assert "CPU" in str(missing_resource(ReplicaResources(2, 0, 0), cpu_nodes))
    assert "memory" in str(missing_resource(ReplicaResources(1, 0, 16), cpu_nodes))


def test_the_model_archive_unpacks_to_the_same_digest(tmp_path: Path) -> None:
    import io
    import tarfile

    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 1001)
    (src / "code").mkdir()
    (src / "code" / "inference.py").write_text("x = 1\n")
    data = b"".join(tar_stream(src))
    dest = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(dest, filter="data")
    assert tree_digest(dest) == tree_digest(src)


def test_an_address_nothing_answers_is_one_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConfigError) as err:
            check_ray_address(f"127.0.0.1:{port}", timeout_s=2)
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err.value.message
    with pytest.raises(ConfigError, match="not host:port"):
        check_ray_address("nonsense")
    with pytest.raises(ConfigError, match="ray://"):
        check_ray_address("ray://head:10001")
