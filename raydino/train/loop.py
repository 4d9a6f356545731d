"""The Ray Train worker loop: DDP student, EMA teacher, Ray Data shards, checkpoints.

Everything numerical is in ``raydino.engine.DINOStep``; this module adds what a
distributed run needs: device placement, the dataset shard (all epochs in one stream,
see ``raydino.data.pipeline.epoch_stream``), per-epoch augmentation seeds (through the
EpochClock), resumable checkpoints, evaluation and logging on rank 0.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydino.config import Config
from raydino.data.augment import crop_names
from raydino.engine import DINOStep, NonFiniteLossError, build_loss, build_models, build_optimizer, normalize_crops
from raydino.eval.evaluate import EvalData, evaluate_network
from raydino.eval.prototypes import kappa_statistics
from raydino.train.checkpoint import read_checkpoint, rng_state, set_rng_state, write_checkpoint

CHECKPOINT_PREFIX = "checkpoint"


class TrainingDiverged(RuntimeError):
    """A non-finite loss, with the step and the checkpoint to go back to."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _kappa_metrics(student_norms: torch.Tensor, teacher_norms: torch.Tensor, cfg: Config, teacher_temp: float) -> dict:
    out = {}
    for name, norms, temp in (("student", student_norms, cfg.loss.student_temp), ("teacher", teacher_norms, teacher_temp)):
        stats = kappa_statistics(norms, temp)
        for key in ("q05", "q50", "q95"):
            out[f"kappa_{name}_{key}"] = stats[key]
    return out


def _quiet_report_logs() -> None:
    """Ray Train logs every report (metrics dict included) at INFO under a logger named by file
    path, which LoggingConfig does not reach; our per-epoch line says what matters."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _say(line: str) -> None:
    """One progress line on the worker's stdout, which Ray streams to the driver.

    Ray Train patches ``print`` in its workers to log through the root logger and, when Ray
    has wrapped ``sys.stdout``, to print as well, so a plain ``print`` reached the console
    twice. Printing to ``sys.__stdout__`` bypasses that patch (it leaves other files alone).
    """
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run by every Ray Train worker. ``loop_config`` is built by ``raydino.train.driver``."""
    cfg = Config.model_validate(loop_config["config"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    epoch_clock = loop_config["epoch_clock"]
    eval_data: EvalData | None = loop_config.get("eval_data")
    tracking_uri, run_id = loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")

    _quiet_report_logs()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker, teacher included
    student, teacher = build_models(cfg)
    teacher.to(device)
    loss_fn = build_loss(cfg).to(device)
    ddp_student = ray.train.torch.prepare_model(student)
    student_module = ddp_student.module if hasattr(ddp_student, "module") else ddp_student
    optimizer = build_optimizer(cfg, student_module)

    step, epoch, batch_in_epoch, last_checkpoint_step = 0, 0, 0, None
    restored_eval: dict[str, float] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(directory, map_location=device)
        student_module.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["loss"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if state["steps_per_epoch"] != steps_per_epoch:  # resumed with another worker count or batch size
            batch_in_epoch = round(batch_in_epoch * steps_per_epoch / state["steps_per_epoch"])
            step = epoch * steps_per_epoch + batch_in_epoch  # same progress through the run, same schedules
        last_checkpoint_step = step
        restored_eval = state.get("latest_eval", {})
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if rank == 0:
            _say(f"raydino: resumed from step {step} (epoch {epoch + 1}, batch {batch_in_epoch})")
    total_steps = steps_per_epoch * cfg.optim.epochs

    logger = None
    if rank == 0 and tracking_uri and run_id:
        from raydino.tracking import RunLogger

        logger = RunLogger(tracking_uri, run_id)

    step_fn = DINOStep(cfg, ddp_student, student_module, teacher, loss_fn, optimizer, device)
    shard = ray.train.get_dataset_shard("train")
    names = crop_names(cfg.data.crops.local_number)
    batch_size = cfg.data.batch_size_per_worker

    def save_and_report(metrics: dict[str, float]) -> None:
        nonlocal last_checkpoint_step
        rngs: list[Any] = [None] * ctx.get_world_size()
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        # every report carries the latest evaluation, so a Tune scheduler (ASHA on knn_top1)
        # finds its metric in mid-epoch checkpoint reports too
        report = {**latest_eval, **metrics, "step": step, "epoch": epoch}
        if rank != 0:
            ray.train.report(report)
            last_checkpoint_step = step
            return
        state = {
            "student": student_module.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loss": loss_fn.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "steps_per_epoch": steps_per_epoch,
            "rng": rngs,
            "latest_eval": latest_eval,
        }
        with tempfile.TemporaryDirectory(prefix="raydino-ckpt-") as tmp:
            write_checkpoint(Path(tmp), state, cfg.to_yaml())
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"{CHECKPOINT_PREFIX}_{step:08d}",
            )
        last_checkpoint_step = step

    def last_checkpoint() -> str:
        return f"step {last_checkpoint_step}" if last_checkpoint_step is not None else "none yet"

    metrics: dict[str, float] = {}
    evaluating = rank == 0 and eval_data is not None and cfg.eval.every_epochs > 0
    latest_eval: dict[str, float] = (restored_eval or {"knn_top1": float("nan")}) if evaluating else {}
    if rank == 0:  # this attempt streams epochs epoch, epoch + 1, ... (see EpochClock)
        ray.get(epoch_clock.set.remote(epoch), timeout=60)
    _barrier()  # no worker starts the data before the clock shows it
    # One iterator for the whole run: one Ray Data execution, crop actors started once.
    # After a resume the stream starts afresh; the steps already trained are not replayed.
    stream = iter(
        shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            prefetch_batches=2,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_batches * batch_size or None,
            local_shuffle_seed=cfg.seed + 1000 * epoch + rank,
            device="cpu",
        )
    )
    while epoch < cfg.optim.epochs:
        started = time.perf_counter()
        while batch_in_epoch < steps_per_epoch:
            batch = next(stream, None)
            if batch is None:
                raise RuntimeError(
                    f"the data stream ended at step {step} of {total_steps}: the dataset yielded fewer images "
                    f"than the {total_steps} steps planned from the files listed. Undecodable files are skipped "
                    "(each is logged as 'skipping undecodable image <path>'); remove them, or files deleted "
                    f"since the start, and run again to resume (last checkpoint: {last_checkpoint()})."
                )
            crops = normalize_crops([batch[name] for name in names], device)
            try:
                metrics = step_fn(crops, step, total_steps)
            except NonFiniteLossError as exc:
                raise TrainingDiverged(f"{exc} Last good checkpoint: {last_checkpoint()}.") from None
            step += 1
            batch_in_epoch += 1
            if logger is not None and step % cfg.tracking.log_every_steps == 0:
                metrics.update(_kappa_metrics(student_module.head.prototype_norms(), teacher.head.prototype_norms(), cfg, metrics["teacher_temp"]))
                logger.log_metrics({**metrics, "epoch": epoch}, step)
            every = cfg.checkpoint.every_steps
            if every and step % every == 0 and batch_in_epoch < steps_per_epoch:
                save_and_report(metrics)
        epoch_metrics = {**metrics, "epoch_seconds": time.perf_counter() - started}
        if evaluating and (epoch + 1) % cfg.eval.every_epochs == 0:
            latest_eval = evaluate_network(teacher, eval_data, device, cfg.eval.knn_k, cfg.eval.knn_temperature)
            epoch_metrics.update(latest_eval)
        if rank == 0:
            line = f"epoch {epoch + 1}/{cfg.optim.epochs}  step {step}/{total_steps}  loss {metrics.get('loss', float('nan')):.4f}"
            if "knn_top1" in epoch_metrics:
                line += f"  kNN top-1 {epoch_metrics['knn_top1']:.1f}%  prototypes in use {epoch_metrics['prototypes_in_use']:.0f}"
            _say(line + f"  ({epoch_metrics['epoch_seconds']:.0f} s)")
            if logger is not None:  # per-step metrics were logged already; add what the epoch adds
                logger.log_metrics({k: v for k, v in epoch_metrics.items() if k not in metrics}, step)
        epoch += 1
        batch_in_epoch = 0
        save_and_report(epoch_metrics)
