"""What a Ray cluster has and can grow to, and whether a run fits it. No Ray import: the caller
passes ``ray.cluster_resources()`` / ``ray.available_resources()``, so this is tested on plain dicts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""Where ``ray up`` leaves the cluster config on the head node (Ray Tune looks there too)."""


def max_resources_of(cluster_config: Mapping[str, Any]) -> dict[str, float]:
    """What a cluster launched from ``cluster_config`` (a ``ray up`` YAML) can grow to: each node type's
    ``resources`` times its ``max_workers`` (the head type once). Node types without explicit
    ``resources`` add nothing (their size is known only once a node is up)."""
    head = cluster_config.get("head_node_type")
    total: dict[str, float] = {}
    for name, node_type in (cluster_config.get("available_node_types") or {}).items():
        count = 1 if name == head else int(node_type.get("max_workers", 0))
        for key, value in (node_type.get("resources") or {}).items():
            total[key] = total.get(key, 0.0) + float(value) * count
    return total


def cluster_capacity(current: Mapping[str, float], bootstrap_config: Path = BOOTSTRAP_CONFIG) -> dict[str, float]:
    """Resources the Ray cluster has now or can grow to: on a ``ray up`` cluster (its bootstrap config on
    this node) the autoscaler may add nodes up to each type's ``max_workers``, so a fresh cluster with
    no GPU node up yet can still run GPU trials (they wait as PENDING while nodes start)."""
    path = bootstrap_config.expanduser()
    grown: dict[str, float] = {}
    if path.is_file():
        import yaml

        grown = max_resources_of(yaml.safe_load(path.read_text()) or {})
    return {key: max(float(current.get(key, 0.0)), grown.get(key, 0.0)) for key in {*current, *grown}}


def _shortfall(needs: Mapping[str, float], have: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in needs.items() if v > float(have.get(k, 0.0)) + 1e-9}


def _describe(resources: Mapping[str, float], keys: list[str]) -> str:
    return ", ".join(f"{float(resources.get(k, 0.0)):g} {k}" for k in keys)


def fit_verdict(
    needs: Mapping[str, float], free: Mapping[str, float], total: Mapping[str, float], capacity: Mapping[str, float]
) -> tuple[str, str]:
    """("fits" | "wait" | "never", message). ``needs``: what the run holds at once (train workers, the
    crop pool's minimum, a reader); ``free`` what the cluster has unclaimed now, ``total`` its size,
    ``capacity`` what it can grow to. "never": more than the cluster can ever hold; "wait": held by
    other jobs now, or nodes still to be added."""
    keys = [k for k in needs if needs[k] > 0]
    if not _shortfall(needs, free):
        return "fits", ""
    if _shortfall(needs, capacity):
        return "never", (
            f"this run needs {_describe(needs, keys)} at once, but the Ray cluster has {_describe(total, keys)} "
            f"and cannot grow beyond {_describe(capacity, keys)}"
        )
    grows = bool(_shortfall(needs, total))
    why = "the autoscaler adds nodes" if grows else "other jobs hold part of the cluster"
    return "wait", (
        f"this run needs {_describe(needs, keys)} at once; free now: {_describe(free, keys)} "
        f"(cluster total {_describe(total, keys)}): it waits while {why}"
    )
