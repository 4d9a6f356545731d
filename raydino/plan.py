"""A run's plan: what ``pretrain`` resolves once, before Ray starts, for the driver and workers.

Run name, checkpoint storage, tracking URI and data path are each resolved and checked
here and nowhere else, so a user error fails in a second with a message, and the driver
and the workers receive values rather than re-deriving them. No Ray, no MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from raydino.config import Config, with_overrides
from raydino.locations import locate
from raydino.registry import DATA_SOURCES
from raydino.storage import join_storage, resolve_storage


@dataclass(frozen=True)
class RunPlan:
    """One pretraining run, resolved: ``cfg`` carries the run name, tracking URI and storage too."""

    cfg: Config
    run_name: str
    storage: str
    """Absolute local directory or remote URI (``s3://...``) where Ray Train keeps the run."""
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None

    @property
    def run_dir(self) -> str:
        return join_storage(self.storage, self.run_name)

    @property
    def max_failures(self) -> int:
        return self.cfg.checkpoint.max_failures


def default_run_name(cfg: Config) -> str:
    """A new name every time (a timestamp): runs resume only under a name given explicitly."""
    return f"{cfg.method_name}-{cfg.data.source}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_data_path(cfg: Config) -> None:
    """Fail fast on a missing data directory, an unreachable object store or refused credentials
    (ObjectStoreError); the sources check the directory's contents when listing."""
    layout = DATA_SOURCES[cfg.data.source].layout
    if layout is None:
        return
    location = locate(str(cfg.data.path))
    if location.kind() != "dir":
        raise FileNotFoundError(f"data path {location.uri!r} does not exist or is not a directory; expected {layout}")


def standard_eval_paths(cfg: Config) -> dict[str, str]:
    """ImageNet's standard layout, ``<root>/train/<class>/...`` beside ``<root>/val/<class>/...``: kNN on
    them by default (``eval.train_path`` the training folder, ``eval.test_path`` its ``val`` sibling)
    when the run trains on ``<root>/train`` and sets neither eval path; {} otherwise. Local or URI alike."""
    if cfg.data.source != "imagefolder" or cfg.eval.train_path or cfg.eval.test_path or not cfg.data.path:
        return {}
    train = locate(cfg.data.path)
    if train.name != "train":
        return {}
    val = train.sibling("val")
    if val.kind() != "dir" or not val.subdirectories():
        return {}
    return {"eval.train_path": train.uri, "eval.test_path": val.uri}


def plan_run(cfg: Config, tracking_uri: str | None = None, mlflow_run_id: str | None = None) -> RunPlan:
    """Resolve the run name and storage (created and checked writable, or a remote URI kept as is),
    check the data path, find the standard train/val layout for kNN, and record them in the config
    that is logged and checkpointed."""
    check_data_path(cfg)
    run_name = cfg.tracking.run_name or default_run_name(cfg)
    storage = resolve_storage(cfg.checkpoint.storage_path)
    updates: dict[str, object] = {"tracking.run_name": run_name, "checkpoint.storage_path": storage,
                                  **standard_eval_paths(cfg)}
    if tracking_uri is not None:
        updates["tracking.uri"] = tracking_uri
    return RunPlan(with_overrides(cfg, updates), run_name, storage, tracking_uri, mlflow_run_id)
