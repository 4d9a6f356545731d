"""The driver of a pretraining run: Ray, the Ray Data pipeline, one TorchTrainer, its result.

Takes a ``RunPlan`` (run name, storage, tracking resolved and checked by ``pretrain``);
a dataset smaller than one batch fails here, before the first worker starts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from raydino.config import Config
from raydino.data.clock import start_crop_meter, start_epoch_clock
from raydino.data.eval_data import load_eval_data
from raydino.data.pipeline import epoch_stream, multicrop_dataset
from raydino.data.sources import source_from_config
from raydino.eval.data import EvalData
from raydino.plan import RunPlan
from raydino.step import TrainingDiverged
from raydino.storage import is_remote, join_storage, ray_storage, resolve_storage
from raydino.train.loop import WorkerPlan, train_loop_per_worker


class PretrainError(RuntimeError):
    """A run that could not start or did not finish; the message says why and what to do."""


@dataclass
class TrainResult:
    """What the fit produced: the latest checkpoint as a local directory, and the last report."""

    checkpoint_dir: Path | None
    """Local: the checkpoint in storage itself; remote storage: a downloaded copy."""
    local_run_dir: Path
    """A local directory of the run for files such as the exported backbone."""
    steps: int
    metrics: dict[str, float]
    skipped_images: int
    eval_data: EvalData | None = None
    crop_stats: dict[str, float] = field(default_factory=dict)
    """``CropMeter.summary()``: actors the multi-crop pool used, images per second per busy actor."""
    """The evaluation arrays the workers used, loaded once per run: the final evaluation reuses them."""


def _crop_summary(meter: Any) -> dict[str, float]:
    """The crop meter's totals; {} if it cannot answer within 30 s (a statistic must not fail a run)."""
    try:
        return ray.get(meter.summary.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a lost meter costs a log line, never the run
        return {}


def required_cpus(cfg: Config) -> float:
    """Logical CPUs a run needs to start: train workers + the crop pool's minimum + one for reading/decoding
    (an autoscaling pool grows into whatever else the cluster has or adds)."""
    train = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    return train + cfg.crop_pool()[0] * cfg.data.cpus_per_crop_actor + 1


def stream_passes(epochs: int) -> int:
    """Passes over the source to stream for ``epochs`` epochs of steps, with slack.

    Steps per epoch come from the files listed; files that turn out undecodable are
    skipped, so a pass can hold fewer rows. The spare passes (one, plus one per eight
    epochs) absorb 10% of the files skipped; passes nobody reads are never computed.
    """
    return epochs + 1 + epochs // 8


def ensure_ray(cfg: Config, extra_cpus: float = 0.0) -> None:
    """Connect to RAY_ADDRESS or to a Ray already running on this machine; else start a local
    Ray sized for this run.

    Logical CPUs are bookkeeping: on a small machine we declare enough for the run to
    schedule (an under-sized cluster hangs silently instead of failing); ``extra_cpus``
    is what else must fit beside one run (a sweep's trial driver).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    try:  # a cluster started with `ray start` / `ray up` on this machine
        ray.init(address="auto", log_to_driver=True, logging_level="WARNING")
        quiet_ray_data()
        return
    except ConnectionError:
        pass
    num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(cfg) + extra_cpus))
    ray.init(num_cpus=num_cpus, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    quiet_ray_data()


def quiet_ray_data() -> None:
    """One progress line per epoch from us instead of Ray Data's per-operator bars."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _root_cause(exc: BaseException) -> BaseException:
    """The first worker's exception inside Ray's wrappers, when there is one."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return getattr(inner, "cause", None) or inner.__cause__ or inner
    return exc


def _diverged_message(exc: BaseException) -> str | None:
    """The TrainingDiverged message a worker raised, from the exception or its traceback text."""
    root = _root_cause(exc)
    if isinstance(root, TrainingDiverged):
        return str(root)
    match = re.search(r"TrainingDiverged: (.+)", str(exc)) or re.search(r"TrainingDiverged: (.+)", str(root))
    return match.group(1) if match else None


def build_trainer(
    cfg: Config, dataset: ray.data.Dataset, plan: WorkerPlan, run_config: ray.train.RunConfig
) -> TorchTrainer:
    """The TorchTrainer for ``train_loop_per_worker`` with the config's scaling (gloo on CPU, NCCL on GPU)."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=run_config,
        datasets={"train": dataset},
    )


def _local_checkpoint(checkpoint: ray.train.Checkpoint | None, storage: str, local_run_dir: Path) -> Path | None:
    """The checkpoint as a local directory: itself on local storage, a download from remote storage."""
    if checkpoint is None:
        return None
    if not is_remote(storage):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(str(local_run_dir / Path(checkpoint.path).name)))


def run_pretraining(
    plan: RunPlan, *, log: Callable[[str], None] = print, run_callbacks: list[Any] | None = None
) -> TrainResult:
    """Fit one TorchTrainer for ``plan``; it resumes when a run of the same name exists in storage."""
    cfg = plan.cfg
    ensure_ray(cfg)
    source = source_from_config(cfg.data, "train", cfg.seed)
    world = cfg.scaling.num_workers
    steps_per_epoch = source.num_files // world // cfg.data.batch_size_per_worker
    if steps_per_epoch < 1:
        raise PretrainError(
            f"the dataset has {source.num_files} images, fewer than one global batch "
            f"({world} workers x data.batch_size_per_worker={cfg.data.batch_size_per_worker}); "
            "lower data.batch_size_per_worker or scaling.num_workers"
        )
    clock = start_epoch_clock()
    meter = start_crop_meter()
    dataset = multicrop_dataset(
        # in-memory rows cannot turn out undecodable: only file sources need spare passes
        epoch_stream(
            source.dataset,
            cfg.optim.epochs if source.in_memory else stream_passes(cfg.optim.epochs),
            cfg.seed if source.in_memory else None,
        ),
        cfg.data.crops,
        cfg.seed,
        cfg.crop_pool(),
        cfg.data.crop_batch_size,
        cpus_per_actor=cfg.data.cpus_per_crop_actor,
        actor_resources=cfg.data.crop_actor_resources,
        epoch_clock=clock,
        meter=meter,
    )
    eval_data = load_eval_data(cfg)  # once per run: the final evaluation gets it from TrainResult
    worker_plan = WorkerPlan(cfg, steps_per_epoch, clock, eval_data, plan.tracking_uri, plan.mlflow_run_id)
    storage_path, storage_filesystem = ray_storage(plan.storage)
    trainer = build_trainer(
        cfg,
        dataset,
        worker_plan,
        ray.train.RunConfig(
            name=plan.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=plan.max_failures),
            callbacks=run_callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our epoch lines, not per-report INFO
        ),
    )
    log(
        f"raydino: run {plan.run_name!r}: {cfg.model.name}, {source.num_files} images, {world} workers x "
        f"{cfg.data.batch_size_per_worker}, {steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs; "
        f"checkpoints in {plan.run_dir}"
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the one the user can act on
        root = _root_cause(exc)
        message = _diverged_message(exc) or f"{type(root).__name__}: {str(root)[-2000:]}"
        raise PretrainError(f"training failed: {message}\n(full logs: {plan.run_dir})") from exc
    finally:
        crops = _crop_summary(meter)
        ray.kill(clock)
        ray.kill(meter)
    low, high = cfg.crop_pool()
    log(
        f"raydino: multi-crop used {crops.get('crop_actors_used', 0):.0f} actor(s) (pool {low}..{high}), "
        f"{crops.get('crop_images_per_second_per_actor', 0):.0f} images/s per busy actor"
    )
    if result.error is not None:
        raise PretrainError(f"training failed: {result.error}")
    # exports and downloaded checkpoints of a run on remote storage go to the local default storage
    local_run_dir = Path(join_storage(resolve_storage(None), plan.run_name) if is_remote(plan.storage) else plan.run_dir)
    local_run_dir.mkdir(parents=True, exist_ok=True)
    metrics = dict(result.metrics or {})
    return TrainResult(
        checkpoint_dir=_local_checkpoint(result.checkpoint, plan.storage, local_run_dir),
        local_run_dir=local_run_dir,
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        skipped_images=source.skipped.count(),
        crop_stats=crops,
        eval_data=eval_data,
    )
