"""What a sweep is (base config, search space, ASHA, arms) and what it checks before any trial.

Nothing here starts Ray: a bad key, value or cluster size fails on the driver in seconds.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.search.sample import Domain

from raydino.config import Config, ConfigError, with_overrides
from raydino.config.registry import DATA_SOURCES
from raydino.data.eval_data import has_eval_data
from raydino.launch.capacity import BOOTSTRAP_CONFIG, cluster_capacity, max_resources_of  # noqa: F401 - re-exported
from raydino.train.driver import required_cpus


@dataclass
class Asha:
    """ASHA early stopping on a per-epoch metric; rungs at grace_period * reduction_factor^i epochs."""

    metric: str = "knn_top1"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepSpec:
    """A sweep: a base config and a search space of dotted overrides.

    ``space`` maps a config key to a list (grid search: every value), a Tune domain
    (``tune.uniform``, ``tune.loguniform``, ``tune.choice`` ...: sampled ``num_samples``
    times) or a single value. ``arm_keys`` name the keys that identify an arm of the
    comparison (default: every grid key except ``seed``); they become MLflow tags.
    ``storage_path`` (default: the base's ``checkpoint.storage_path``) may be a local
    directory or a remote URI such as ``s3://bucket/prefix``.
    """

    name: str
    base: Config
    space: dict[str, Any]
    num_samples: int = 1
    arm_keys: list[str] | None = None
    asha: Asha | None = None
    trial_retries: int = 1
    worker_failures: int = 0
    max_concurrent_trials: int | None = None
    trial_cpus: float = 1.0
    storage_path: str | os.PathLike[str] | None = None

    def grid_keys(self) -> list[str]:
        return [k for k, v in self.space.items() if isinstance(v, list)]

    def arms(self) -> list[str]:
        return self.arm_keys if self.arm_keys is not None else [k for k in self.grid_keys() if k != "seed"]


@dataclass
class TrialOutcome:
    trial_id: str
    overrides: dict[str, Any]
    status: str  # FINISHED, KILLED (stopped early), FAILED
    attempts: int
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[TrialOutcome]
    max_concurrent_trials: int
    seconds: float

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)


def grid_points(space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every grid combination, with one sample of each random domain (for validation)."""
    grid = {k: v for k, v in space.items() if isinstance(v, list)}
    fixed = {k: (v.sample() if isinstance(v, Domain) else v) for k, v in space.items() if k not in grid}
    return [{**fixed, **dict(zip(grid, combo))} for combo in itertools.product(*grid.values())]


EMBEDDED = ", ".join(name for name, info in DATA_SOURCES.items() if info.embedded)


def validate_space(spec: SweepSpec) -> list[Config]:
    """Build the config of every grid point now, so a bad key or value fails before any trial."""
    if not spec.space:
        raise ConfigError("the search space is empty; give at least one key, e.g. loss.vmf=[false, true]")
    empty = [k for k, v in spec.space.items() if isinstance(v, list) and not v]
    if empty:
        raise ConfigError(f"search space key(s) {', '.join(empty)} have an empty list of values")
    if spec.trial_retries < 0 or spec.num_samples < 1 or (spec.max_concurrent_trials or 1) < 1:
        raise ConfigError("trial_retries must be >= 0, num_samples and max_concurrent_trials >= 1")
    configs = []
    for point in grid_points(spec.space):
        try:
            configs.append(with_overrides(spec.base, point))
        except ConfigError as exc:
            raise ConfigError(f"search space point {point} is invalid: {exc}") from None
    if spec.asha is not None:
        if any(c.eval.every_epochs != 1 for c in configs):
            raise ConfigError("ASHA needs a kNN evaluation every epoch: set eval.every_epochs=1")
        if not all(has_eval_data(c) for c in configs):
            raise ConfigError(
                "ASHA compares trials on kNN top-1, which needs labelled evaluation data: set eval.train_path "
                f"and eval.test_path (labelled ImageFolders), or use an embedded data.source ({EMBEDDED})"
            )
        if spec.asha.metric.startswith(("final_", "random_init_")):
            raise ConfigError(f"ASHA metric {spec.asha.metric!r} exists only after the last epoch; use a per-epoch "
                              "metric such as knn_top1")
    unknown = [k for k in spec.arms() if k not in spec.space]
    if unknown:
        raise ConfigError(f"arm key(s) {', '.join(unknown)} are not in the search space ({', '.join(spec.space)})")
    return configs


def absolute_paths(cfg: Config) -> Config:
    """Tune runs each trial in its own working directory: resolve relative paths on the driver
    (URIs such as ``s3://`` stay as they are)."""
    paths = {"data.path": cfg.data.path, "eval.train_path": cfg.eval.train_path, "eval.test_path": cfg.eval.test_path,
             "checkpoint.storage_path": cfg.checkpoint.storage_path}
    updates = {k: str(Path(str(v)).expanduser().resolve()) for k, v in paths.items() if v and "://" not in str(v)}
    return with_overrides(cfg, updates) if updates else cfg


def trial_resources(cfg: Config, trial_cpus: float) -> dict[str, float]:
    """What one trial needs in all: its Tune driver (which also runs the final evaluation)
    plus what its TorchTrainer requests (Train workers, Ray Data crop actors and readers)."""
    return {"CPU": required_cpus(cfg) + trial_cpus, "GPU": float(cfg.scaling.num_workers if cfg.scaling.use_gpu else 0)}


def derive_max_concurrent(configs: Sequence[Config], trial_cpus: float, cluster: Mapping[str, float]) -> int:
    """How many of the largest trial fit ``cluster`` (resources now, or what an autoscaling cluster can
    grow to: ``cluster_capacity``) at once; at least one. A trial larger than that is an error."""
    need_cpu = max(trial_resources(c, trial_cpus)["CPU"] for c in configs)
    need_gpu = max(trial_resources(c, trial_cpus)["GPU"] for c in configs)
    if need_gpu > cluster.get("GPU", 0):
        raise ConfigError(
            f"one trial needs {need_gpu:g} GPU(s) (scaling.num_workers with scaling.use_gpu=true) but the Ray "
            f"cluster has, or can grow to, {cluster.get('GPU', 0):g}; lower scaling.num_workers, or raise the GPU "
            "node type's max_workers in the cluster config"
        )
    fits = math.floor(cluster.get("CPU", 0) / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / need_gpu + 1e-9))
    return max(1, fits)


def config_value(cfg: Config, dotted: str) -> Any:
    """The validated value of a dotted key (``model.kwargs.depth`` reaches into kwargs)."""
    node: Any = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def arm_values(cfg: Config, arm_keys: Sequence[str]) -> dict[str, str]:
    """An arm as strings, as the tags ``raydino.arm.<key>`` hold them (what the report groups by)."""
    return {k: str(config_value(cfg, k)) for k in arm_keys}


def arm_label(values: Mapping[str, str]) -> str:
    """``key=value, ...`` (the ``raydino.arm`` tag); ``all`` when no key names an arm."""
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all"
