"""cluster.yaml is checked offline with Ray's own autoscaler schema (there is no `ray up --dry-run`)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation():
    config = yaml.safe_load(CLUSTER.read_text())
    prepared = prepare_config(config)  # fills Ray's defaults, as `ray up` does
    validate_config(prepared)  # Ray's JSON schema for cluster configs, plus its own checks
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] <= prepared["max_workers"]
    assert any("pip install -e /home/ubuntu/raydino" in c for c in prepared["setup_commands"])
    assert any("mlflow server" in c for c in prepared["head_setup_commands"])


def test_broken_cluster_yaml_is_rejected():
    import pytest

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_worker"]["bogus_key"] = 1
    with pytest.raises(Exception, match="bogus_key"):
        validate_config(prepare_config(config))
