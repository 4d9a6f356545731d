"""cluster.yaml is checked offline: Ray's own autoscaler schema and checks (there is no `ray up --dry-run`),
then what the file promises: a head that takes no work, autoscaling GPU and CPU worker types, the Ray image
of the installed version, shared memory for every container, raydino installed everywhere, remote storage,
and nothing (MLflow, dashboard) listening on all interfaces or opened to the internet. No cluster starts."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raydino.config import load_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"
ALL_INTERFACES = {"0.0.0.0", "::", "[::]", "*", ""}
# 8-GPU EC2 types: (GPUs, vCPUs); Ray detects GPUs per instance type, the file states them
EIGHT_GPU_TYPES = {
    "p4d.24xlarge": (8, 96),
    "p4de.24xlarge": (8, 96),
    "p5.48xlarge": (8, 192),
    "g5.48xlarge": (8, 192),
    "g6.48xlarge": (8, 192),
    "g6e.48xlarge": (8, 192),
}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def config(raw: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(raw))  # Ray's defaults and merges, as `ray up` does
    validate_config(prepared)  # Ray's JSON schema for cluster configs, plus its own checks
    return prepared


def _types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["available_node_types"]


def _workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in _types(config).items() if name != config["head_node_type"]}


def _gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in _workers(config).items() if t["resources"].get("GPU", 0) > 0}


def _cpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in _workers(config).items() if t["resources"].get("GPU", 0) == 0}


def _run_options(config: dict[str, Any], node_type: str) -> list[str]:
    """What Ray passes to `docker run` for a node type: run_options plus head_run_options on the head;
    on a worker, its node type's docker section replaces the global worker_run_options (a dict update)."""
    docker = config["docker"]
    if node_type == config["head_node_type"]:
        extra = docker.get("head_run_options", [])
    else:
        extra = {**docker, **_types(config)[node_type].get("docker", {})}.get("worker_run_options", [])
    return [*docker.get("run_options", []), *extra]


def _option_value(tokens: list[str], flag: str) -> str | None:
    for i, token in enumerate(tokens):
        if token == flag:
            return tokens[i + 1] if i + 1 < len(tokens) else ""
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def _mlflow_command(config: dict[str, Any]) -> str:
    commands = [c for c in config["head_setup_commands"] if "mlflow server" in c]
    assert len(commands) == 1, "exactly one head setup command starts the MLflow server"
    return commands[0]


def _all_commands(config: dict[str, Any]) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    commands = [c for key in keys for c in config.get(key, [])]
    for t in _types(config).values():
        commands += t.get("initialization_commands", []) + t.get("worker_setup_commands", [])
    return commands


def test_cluster_yaml_passes_ray_validation(config):  # the fixture runs Ray's validation
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["head_node_type"] in _types(config)


def test_head_takes_no_work(config):
    head = _types(config)[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # Ray passes this to `ray start` (RAY_OVERRIDE_RESOURCES)
    assert head["resources"].get("GPU", 0) == 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in start


def _is_spot(node_type: dict[str, Any]) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_gpu_worker_type_autoscales_with_eight_gpus(config):
    gpu_types = _gpu_types(config)
    on_demand = [t for t in gpu_types.values() if not _is_spot(t)]
    assert len(on_demand) == 1, "one on-demand GPU worker type"
    (gpu,) = on_demand
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    for t in gpu_types.values():
        instance = t["node_config"]["InstanceType"]
        assert instance in EIGHT_GPU_TYPES, f"{instance} is not a known 8-GPU instance type"
        gpus, vcpus = EIGHT_GPU_TYPES[instance]
        assert t["resources"]["GPU"] == gpus == 8  # one Ray Train worker per GPU
        assert 0 < t["resources"]["CPU"] <= vcpus


def test_the_spot_gpu_type_is_opt_in_and_its_notices_reach_the_run(config):
    """Spot capacity only when asked for (max_workers 0 until raised), the same nodes as the on-demand type,
    and IMDSv2 reachable for the interruption notice that checkpoint.spot_notices watches."""
    spot = {name: t for name, t in _gpu_types(config).items() if _is_spot(t)}
    assert len(spot) == 1, "one opt-in spot GPU worker type"
    ((name, t),) = spot.items()
    assert t["min_workers"] == 0 == t["max_workers"], f"{name}: spot is opt-in"
    (on_demand,) = [g for g in _gpu_types(config).values() if not _is_spot(g)]
    assert t["resources"] == on_demand["resources"]
    assert t["node_config"]["InstanceType"] == on_demand["node_config"]["InstanceType"]
    metadata = t["node_config"]["MetadataOptions"]
    assert metadata["HttpTokens"] == "required" and metadata["HttpPutResponseHopLimit"] >= 2
    assert load_config().checkpoint.spot_notices  # on by default: the nodes need no setting


def test_cpu_worker_type_for_ray_data(config):
    cpu_types = _cpu_types(config)
    assert cpu_types, "a CPU worker type for decode tasks and multi-crop actors"
    for t in cpu_types.values():
        assert t["resources"].get("CPU", 0) > 0
        assert t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"]
    assert sum(t["max_workers"] for t in _workers(config).values()) <= config["max_workers"]


DOCKERFILE = Path(__file__).resolve().parent.parent / "docker" / "Dockerfile"


def test_nodes_run_an_image_with_the_dependencies_and_install_only_the_checkout(config):
    """The node image is built from docker/Dockerfile on the installed Ray's GPU image, with the project's
    dependencies baked in; a node start installs the synced checkout with --no-deps (no torch download)."""
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image"), docker.get("worker_image")]
    images += [t.get("docker", {}).get("worker_image") for t in _types(config).values()]
    assert all(image.endswith("/raydino:" + f"{ray.__version__}-py311-gpu") for image in filter(None, images))
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert match and match.group(1) == ray.__version__, f"{base} is not the installed Ray's GPU image"
    assert re.search(r"pip install --no-cache-dir /tmp/raydino", dockerfile)  # the declared dependencies
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert installs and all("--no-deps" in c for c in installs)


def test_every_container_sets_shm_size(config):
    for node_type in _types(config):
        options = " ".join(_run_options(config, node_type)).split()
        assert _option_value(options, "--shm-size"), f"no --shm-size for {node_type}"


def test_gpus_requested_on_gpu_nodes_only(config):
    assert not config["docker"].get("disable_automatic_runtime_detection", False)
    for node_type in _types(config):
        has_gpus = "--gpus" in " ".join(_run_options(config, node_type))
        assert has_gpus == (node_type in _gpu_types(config)), node_type  # `--gpus all` fails without a driver


def test_setup_installs_raydino_on_every_node(raw, config):
    remote = [dst for dst, src in config["file_mounts"].items() if Path(src) == Path(".")]
    assert remote, "the checkout is synced with file_mounts"
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        assert any(re.search(rf"pip install (--no-deps )?-e {re.escape(remote[0])}\b", c) for c in config[key]), key
    for name, t in _types(raw).items():  # a node type's own list would replace the merged one
        assert "worker_setup_commands" not in t, name


def test_mlflow_server_binds_the_private_address_not_all_interfaces(config):
    command = _mlflow_command(config)
    assert "0.0.0.0" not in command
    tokens = shlex.split(command)
    host = _option_value(tokens, "--host")
    assert host is not None and host not in ALL_INTERFACES  # mlflow's default would be 127.0.0.1
    if host not in ("127.0.0.1", "localhost"):
        # the head's private VPC address, as Ray resolves it for the head node, checked non-empty
        variable = host.lstrip("$").strip("{}")
        assert re.search(rf"{variable}=\$\(python -c 'import ray.util; print\(ray.util.get_node_ip_address\(\)\)'\)",
                         command)
        assert f'[ -n "${variable}" ] || exit 1' in command
    assert (_option_value(tokens, "--backend-store-uri") or "").startswith("sqlite:////")  # the head's disk
    assert "--serve-artifacts" in tokens
    allowed = _option_value(tokens, "--allowed-hosts")
    assert allowed and "*" not in allowed.split(",")


def test_nothing_listens_on_all_interfaces(config):
    for command in _all_commands(config):
        assert "0.0.0.0" not in command, command
    start = shlex.split(" ".join(config["head_start_ray_commands"]).replace(";", " "))
    assert _option_value(start, "--dashboard-host") in ("127.0.0.1", "localhost")


def test_no_port_opened_to_the_internet_but_ssh(config):
    # Ray's own security group: intra-cluster traffic and SSH. Own groups would bypass that guarantee.
    for name, t in _types(config).items():
        assert "SecurityGroupIds" not in t["node_config"], name
        assert "NetworkInterfaces" not in t["node_config"], name
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        public = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        public += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if {"0.0.0.0/0", "::/0"} & set(public):
            assert rule.get("FromPort") == rule.get("ToPort") == 22, rule


def test_storage_is_remote_and_one_bucket(config):
    checkpoints = config["metadata"]["checkpoint_storage_path"]
    artifacts = _option_value(shlex.split(_mlflow_command(config)), "--artifacts-destination")
    assert checkpoints.startswith("s3://")
    assert artifacts is not None and artifacts.startswith("s3://")
    bucket = re.search(r"^(\w+)=(\S+?);", _mlflow_command(config))  # RAYDINO_BUCKET=... at the start
    resolved = artifacts.replace(f"${bucket.group(1)}", bucket.group(2)) if bucket else artifacts
    assert resolved == config["metadata"]["mlflow_artifacts"]
    assert checkpoints.split("/")[2] == resolved.split("/")[2], "checkpoints and MLflow artifacts: one bucket"


def test_worker_nodes_get_an_instance_profile_for_s3(config):
    for name, t in _workers(config).items():
        assert "IamInstanceProfile" in t["node_config"], f"{name} cannot write checkpoints to S3 without one"


@pytest.mark.parametrize("where", ["node_type", "docker", "top"])
def test_broken_cluster_yaml_is_rejected(raw, where):
    broken = copy.deepcopy(raw)
    target = {"node_type": broken["available_node_types"]["gpu_worker"], "docker": broken["docker"], "top": broken}
    target[where]["bogus_key"] = 1
    with pytest.raises(Exception, match="bogus_key"):
        validate_config(prepare_config(broken))
