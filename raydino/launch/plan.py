"""A run's plan: what ``pretrain`` resolves once, before Ray starts, for the driver and workers.

Run name, checkpoint storage, tracking URI and data path are each resolved and checked
here and nowhere else, so a user error fails in a second with a message, and the driver
and the workers receive values rather than re-deriving them. No Ray, no MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from raydino.config import Config, ConfigError, build_config, with_overrides
from raydino.config.registry import DATA_SOURCES
from raydino.stores.locations import IMAGE_EXTENSIONS, DataLocation, locate, read_file
from raydino.stores.run_storage import join_storage, resolve_storage
from raydino.stores.shard_manifest import ShardSetError, check_shards, read_manifest


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
    """Fail fast, before the MLflow run and Ray, on a missing data directory, an unreachable object store
    or refused credentials (ObjectStoreError), an ImageFolder without class directories or without an
    image in them, or an image directory without images (the listing stops at the first image)."""
    source = DATA_SOURCES[cfg.data.source]
    layout = source.layout
    if layout is None:
        return
    if cfg.data.source == "shards":  # one line naming a missing or damaged manifest, or a missing shard
        check_shards(*read_manifest(str(cfg.data.path)))
        return
    location = locate(str(cfg.data.path))
    if location.kind() != "dir":
        raise FileNotFoundError(f"data path {location.uri!r} does not exist or is not a directory; expected {layout}")
    images = f"image files ({', '.join(IMAGE_EXTENSIONS)})"
    if source.labelled:
        classes = location.subdirectories()
        if not classes:
            raise FileNotFoundError(f"data path {location.uri!r} has no class subdirectories; expected {layout}")
        if not any(location.child(name).has_image() for name in classes):
            raise FileNotFoundError(
                f"data path {location.uri!r} has no {images} in its class directories; expected {layout}"
            )
    elif not location.has_image():
        raise FileNotFoundError(f"data path {location.uri!r} has no {images}; expected {layout}")


def standard_eval_paths(cfg: Config) -> dict[str, str]:
    """ImageNet's standard layout, ``<root>/train/<class>/...`` beside ``<root>/val/<class>/...`` (or labelled
    shard sets ``<root>/train`` and ``<root>/val``): kNN on them by default (``eval.train_path`` the training
    folder, ``eval.test_path`` its ``val`` sibling) when the run trains on ``<root>/train`` and sets neither
    eval path; {} otherwise. Local or URI alike."""
    if cfg.data.source not in ("imagefolder", "shards") or cfg.eval.train_path or cfg.eval.test_path \
            or not cfg.data.path:
        return {}
    train = locate(cfg.data.path)
    if train.name != "train":
        return {}
    val = train.sibling("val")
    if cfg.data.source == "shards":  # shard sets of train/ and val/ side by side, both labelled
        try:
            labelled = read_manifest(train)[1].labelled and read_manifest(val)[1].labelled
        except ShardSetError:
            return {}
        return {"eval.train_path": train.uri, "eval.test_path": val.uri} if labelled else {}
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


CHECKPOINT_CONFIG = "config.yaml"
STATE_KEYS = ("model.", "head.", "loss.method", "loss.centering", "loss.patch_centering", "optim.layer_decay")
"""Config keys that shape what a checkpoint holds (networks, centering buffers, optimiser groups): a run
resumed with another value cannot load it."""


def checkpoint_folders(run_dir: str) -> list[DataLocation]:
    """A run's ``checkpoint_*`` directories, newest first; none for a run without. Local or remote storage
    alike (listed on the driver)."""
    location = locate(run_dir)
    if location.kind() != "dir":
        return []
    names = sorted((d for d in location.subdirectories() if d.startswith("checkpoint_")), reverse=True)
    return [location.child(name) for name in names]


CHECKPOINT_MANIFEST = "manifest.json"
"""Written last into every checkpoint: the name and size of each other file (``raydino.train.checkpoint``)."""


def checkpoint_complete(folder: DataLocation) -> bool:
    """Whether a checkpoint directory holds its manifest and every file it lists at its full size. Ray Train
    copies a checkpoint into storage file by file: a copy cut short (a full disk, a stopped process) leaves
    a directory that must not be resumed from."""
    import json

    manifest = folder.child(CHECKPOINT_MANIFEST)
    if manifest.kind() != "file":
        return False
    try:
        files = json.loads(read_file(manifest.path, manifest.filesystem))["files"]
    except (ValueError, KeyError, TypeError, OSError):
        return False
    return bool(files) and all(folder.child(name).size() == size for name, size in files.items())


def last_complete_checkpoint(run_dir: str) -> DataLocation | None:
    """The run's newest complete checkpoint directory (``checkpoint_complete``); None if it has none."""
    return next((folder for folder in checkpoint_folders(run_dir) if checkpoint_complete(folder)), None)


def latest_checkpoint_config(run_dir: str) -> tuple[str, Config] | None:
    """(name, config) of the newest ``checkpoint_*`` directory of a run that holds a config; None for a
    run without checkpoints. Local or remote storage alike (the file is read on the driver)."""
    for folder in checkpoint_folders(run_dir):
        child = folder.child(CHECKPOINT_CONFIG)
        if child.kind() == "file":
            import yaml

            try:
                return folder.name, build_config(yaml.safe_load(read_file(child.path, child.filesystem)))
            except (ConfigError, yaml.YAMLError):  # an older raydino's config: the worker's load check decides
                return None
    return None


def check_resumable(plan: RunPlan) -> tuple[str, Config] | None:
    """Refuse, before Ray starts, to continue a run whose checkpoint another architecture wrote: the
    message lists the keys that differ and the two ways out. Returns the newest checkpoint's (name,
    config) it read, or None for a run without checkpoints."""
    found = latest_checkpoint_config(plan.run_dir)
    if found is None:
        return None
    name, saved = found
    old, new = saved.flat(), plan.cfg.flat()
    keys = sorted(k for k in {*old, *new} if k.startswith(STATE_KEYS) and old.get(k) != new.get(k))
    if keys:
        diff = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:8])
        raise ConfigError(
            f"run {plan.run_name!r} has a checkpoint ({name} in {plan.run_dir}) of another configuration ({diff}); "
            "resume it with its own settings, or start a new run with another tracking.run_name"
        )
    return found
