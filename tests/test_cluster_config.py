"""cluster.yaml passes Ray's own cluster-config validation and keeps our security choices."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _validated(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_for_ray_up():
    cfg = yaml.safe_load(CLUSTER.read_text())
    prepared = _validated(cfg)
    assert prepared["head_node_type"] == "head"
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaling GPU pool


def test_cluster_yaml_binds_the_dashboard_to_loopback_with_token_auth():
    cfg = yaml.safe_load(CLUSTER.read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    mlflow = " ".join(cfg["head_setup_commands"])
    # workers' tasks log to it: the head's interface, with MLflow's Host-header guard left on
    assert "mlflow server --host 0.0.0.0" in mlflow and "--disable-security-middleware" not in mlflow
    assert "--gunicorn-opts" not in mlflow and "--waitress-opts" not in mlflow  # they drop the guard
    assert any("pip install" in c and "requirements.txt" in c for c in cfg["setup_commands"])


def test_validation_rejects_a_broken_config():
    cfg = yaml.safe_load(CLUSTER.read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}  # must be integers
    from jsonschema.exceptions import ValidationError

    with pytest.raises(ValidationError, match="0.5 is not of type 'integer'") as err:
        _validated(cfg)
    assert list(err.value.path) == ["available_node_types", "gpu_worker", "resources", "GPU"]
