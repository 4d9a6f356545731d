"""The Ray Train worker loop: DDP student, EMA teacher, Ray Data shards, checkpoints.

Everything numerical is in ``raydino.step.DINOStep``; this module adds what a distributed
run needs: device placement, the dataset shard (all epochs in one stream, see
``raydino.data.pipeline.epoch_stream``), per-epoch augmentation seeds (through the
EpochClock), resumable checkpoints, the non-finite-loss policy, evaluation and logging on
rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydino.data.augment import crop_names
from raydino.eval.collapse import KNOBS, CollapseWatch
from raydino.eval.evaluate import evaluate_network
from raydino.eval.prototypes import kappa_statistics
from raydino.models import normalize_crops
from raydino.step import DINOStep, NonFiniteGuard, NonFiniteLossError
from raydino.train.checkpoint import TrainState, rng_state, set_rng_state, write_checkpoint
from raydino.train.preemption import start_spot_watcher
from raydino.train.progress import ProgressMeter
from raydino.train.stream import WorkerPlan, WorkerStart

if TYPE_CHECKING:
    from raydino.tracking import BackgroundLogger

CHECKPOINT_PREFIX = "checkpoint"


def _say(line: str) -> None:
    """One progress line on the worker's stdout, which Ray streams to the driver.

    Ray Train patches ``print`` in its workers to log through the root logger and, when Ray
    has wrapped ``sys.stdout``, to print as well, so a plain ``print`` reached the console
    twice. Printing to ``sys.__stdout__`` bypasses that patch (it leaves other files alone).
    """
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def _quiet_report_logs() -> None:
    """Ray Train logs every report (metrics dict included) at INFO under a logger named by file
    path, which LoggingConfig does not reach; our per-epoch line says what matters.

    Ray 2.60 has no public switch for that line, so this is the one place that reaches into
    ``ray.train.v2._internal``; tests/test_worker_output.py fails if Ray moves the module or the logger.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logs (the test says so loudly)
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _kappa_metrics(step_fn: DINOStep, teacher_temp: float) -> dict[str, float]:
    out = {}
    networks = (("student", step_fn.student_module, step_fn.cfg.loss.student_temp), ("teacher", step_fn.teacher, teacher_temp))
    for name, network, temp in networks:
        stats = kappa_statistics(network.head.prototype_norms().detach(), temp)
        out.update({f"kappa_{name}_{key}": stats[key] for key in ("q05", "q50", "q95")})
    return out


class _Worker:
    """One worker's run: position in the run, checkpoints, the non-finite policy, rank-0 logging."""

    def __init__(self, start: WorkerStart) -> None:
        plan = start.plan
        self.plan, self.cfg = plan, plan.cfg
        self.ctx = ray.train.get_context()
        self.rank = self.ctx.get_world_rank()
        self.device = start.device
        # the position and the data stream came first (raydino.train.stream): the crop actors start meanwhile
        self.state = start.state
        self.step, self.epoch, self.batch_in_epoch = start.step, start.epoch, start.batch_in_epoch
        self.stream = start.stream
        self.step_fn = DINOStep.build(self.cfg, self.device, wrap_student=ray.train.torch.prepare_model)
        self.total_steps = plan.steps_per_epoch * self.cfg.optim.epochs
        self.last_checkpoint: int | None = None
        self.guard = NonFiniteGuard(self.cfg.optim.nonfinite_loss, self.cfg.optim.max_nonfinite_in_a_row)
        self.evaluating = self.rank == 0 and plan.eval_data is not None and self.cfg.eval.every_epochs > 0
        self.latest_eval: dict[str, float] = {"knn_top1": float("nan")} if self.evaluating else {}
        self.logger = None
        self.logged_upto = -1  # steps at or below were logged by an earlier attempt: one history, no repeats
        self.stop_system_metrics = None
        if self.rank == 0 and plan.tracking_uri and plan.mlflow_run_id:
            from raydino.tracking import BackgroundLogger, start_system_metrics

            os.environ.update(plan.tracking_env)
            self.logger = BackgroundLogger(plan.tracking_uri, plan.mlflow_run_id, _say)
            if self.cfg.tracking.system_metrics:
                interval = min(10.0, max(1.0, self.cfg.tracking.progress_seconds))
                self.stop_system_metrics = start_system_metrics(plan.tracking_uri, plan.mlflow_run_id, interval)
        self.collapse = CollapseWatch(self.cfg.head.num_prototypes) if self.rank == 0 else None
        self.collapse_warned = False
        self.preemption_seen = False
        self.spot_watcher = None
        if self.cfg.checkpoint.spot_notices and self._first_on_its_node():  # one watcher per node
            ckpt = self.cfg.checkpoint
            self.spot_watcher = start_spot_watcher(ckpt.metadata_endpoint, ckpt.notice_poll_s, _say)
        self.progress = ProgressMeter(
            global_batch=self.cfg.data.batch_size_per_worker * self.ctx.get_world_size(),
            steps_per_epoch=plan.steps_per_epoch, total_steps=self.total_steps,
            every_seconds=self.cfg.tracking.progress_seconds,
        ) if self.rank == 0 else None

    def _first_on_its_node(self) -> bool:
        """Whether this worker has the lowest rank among those on its Ray node (by node id: local ranks go by
        IP address, which the nodes of a simulated cluster share). A collective: every worker calls it."""
        node = ray.get_runtime_context().get_node_id()
        if not (dist.is_available() and dist.is_initialized()):
            return True
        nodes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, node)
        return nodes.index(node) == self.rank

    def restore(self) -> None:
        """Load the checkpoint read at start-up (the position already came from it) into the built model."""
        state, self.state = self.state, None
        if state is None:
            return
        self.step_fn.load_state_dict(state.models())
        self.last_checkpoint, self.guard.skipped = self.step, state.nonfinite_skipped
        if self.evaluating and state.latest_eval:
            self.latest_eval = state.latest_eval
        if (rng := state.rng_for(self.rank)) is not None:
            set_rng_state(rng)
        if self.logger is not None:
            self.logged_upto = self.logger.last_step("epoch")
        if self.rank == 0:
            _say(f"raydino: resumed from step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")

    def log(self, metrics: dict[str, float]) -> None:
        """Rank 0 logs at the current step, tagged with the epoch; a step an earlier attempt logged
        (before the crash that this attempt resumed from) is not logged again."""
        if self.logger is not None and self.step > self.logged_upto:
            self.logger.log_metrics({**metrics, "epoch": self.epoch}, self.step)

    def measure(self, data_wait: float, compute: float) -> None:
        """Rank 0: record one step; every ``tracking.progress_seconds`` print a progress line and log
        images/s, step time, data wait share (and peak accelerator memory) to MLflow."""
        if self.progress is None:
            return
        self.progress.record(data_wait, compute)
        if not self.progress.due():
            return
        figures, line, warning = self.progress.report(self.step, self.epoch, self.batch_in_epoch)
        _say(f"raydino: {line}")
        if warning is not None:
            _say(f"raydino: {warning}")
            if self.logger is not None:  # kept on the run as well
                self.logger.set_tags({"raydino.slow_data_warning": warning})
        if self.device.type == "cuda":
            figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log(figures)

    def save(self, metrics: dict[str, float]) -> None:
        """Checkpoint and report; every report carries the latest evaluation, so a Tune scheduler
        (ASHA on knn_top1) finds its metric in mid-epoch reports too."""
        rngs: list[Any] = [None] * self.ctx.get_world_size()
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        report = {**self.latest_eval, **metrics, "step": self.step, "epoch": self.epoch}
        if self.rank != 0:
            ray.train.report(report)
        else:
            state = TrainState(
                **self.step_fn.state_dict(), step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                steps_per_epoch=self.plan.steps_per_epoch, rng=rngs, latest_eval=self.latest_eval,
                nonfinite_skipped=self.guard.skipped,
            )
            with tempfile.TemporaryDirectory(prefix="raydino-ckpt-") as tmp:
                write_checkpoint(Path(tmp), state, self.cfg.to_yaml())
                ray.train.report(
                    report,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"{CHECKPOINT_PREFIX}_{self.step:08d}",
                )
        self.last_checkpoint = self.step

    def watch_preemption(self, metrics: dict[str, float]) -> None:
        """Every step until it comes: Ray Train's preemption signal (a node of this run is being drained, e.g. by
        a spot notice). It is the same on every worker (a collective), so all checkpoint at this step boundary,
        once; Ray Train restarts the run from it when the node goes."""
        if self.preemption_seen or self.step % self.cfg.checkpoint.preemption_check_every_steps:
            return
        info = ray.train.get_preemption_info()
        if info is None:
            return
        self.preemption_seen = True
        deadline = (time.strftime("%H:%M:%S UTC", time.gmtime(info.deadline_ms / 1000))
                    if info.deadline_ms else "no deadline given")
        event = (f"preemption of node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} (ranks "
                 f"{info.preempted_ranks}, {deadline}) seen at step {self.step}")
        if self.last_checkpoint != self.step and self.batch_in_epoch < self.plan.steps_per_epoch:
            self.save(metrics)  # the epoch's last step is checkpointed at the end of the epoch anyway
        if self.rank == 0:
            _say(f"raydino: {event}: checkpoint at step {self.step}; the run resumes from it when the node goes")
            if self.logger is not None:
                self.logger.set_tags({"raydino.preemption": f"{event}; checkpoint at step {self.step}"})
                self.logger.log_metrics({"preemption_checkpoint_step": float(self.step)}, self.step)

    def train_step(self, batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, float] | None:
        """One step; None when a non-finite loss was skipped (``optim.nonfinite_loss=skip``)."""
        crops = normalize_crops([batch[name] for name in names], self.device)
        last = f"step {self.last_checkpoint}" if self.last_checkpoint is not None else "none yet"
        try:
            metrics = self.step_fn(crops, self.step, self.total_steps)
        except NonFiniteLossError as exc:
            self.guard.nonfinite(exc, last)  # raises unless the policy is to skip
            if self.rank == 0:
                _say(f"raydino: skipped step {self.step}: non-finite loss ({self.guard.in_a_row} in a row)")
            return None
        self.guard.finite()
        if self.collapse is not None:
            self.collapse.record(metrics.get("teacher_entropy", math.nan), metrics.get("mean_target_entropy", math.nan))
        return metrics

    def watch_collapse(self, epoch_metrics: dict[str, float]) -> None:
        """Rank 0: metric ``collapsed`` (0/1) every epoch; the first collapsed epoch prints one warning
        and tags the run ``raydino.collapse`` with what was seen."""
        reason = self.collapse.end_epoch(self.epoch, epoch_metrics.get("prototypes_in_use"))
        epoch_metrics.update(self.collapse.epoch_means)
        epoch_metrics["collapsed"] = float(reason is not None)
        if reason is None or self.collapse_warned:
            return
        self.collapse_warned = True
        _say(f"raydino: warning: collapse: {reason}; {KNOBS}")
        if self.logger is not None:
            self.logger.set_tags({"raydino.collapse": reason})

    def end_epoch(self, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        epoch_metrics = {**metrics, "epoch_seconds": seconds, "nonfinite_skipped": float(self.guard.skipped)}
        if self.evaluating and (self.epoch + 1) % self.cfg.eval.every_epochs == 0:
            self.latest_eval = evaluate_network(
                self.step_fn.teacher, self.plan.eval_data, self.device, self.cfg.eval.knn_k, self.cfg.eval.knn_temperature,
                vmf_temperature=self.cfg.usage_temperature,
            )
            epoch_metrics.update(self.latest_eval)
        if self.collapse is not None:
            self.watch_collapse(epoch_metrics)
        if self.rank == 0:
            line = f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}  step {self.step}/{self.total_steps}  "
            line += f"loss {metrics.get('loss', float('nan')):.4f}"
            if "knn_top1" in epoch_metrics:
                line += f"  kNN top-1 {epoch_metrics['knn_top1']:.1f}%"
                line += f"  prototypes in use {epoch_metrics['prototypes_in_use']:.0f}"
            _say(line + f"  ({seconds:.0f} s)")
        return epoch_metrics


def train_loop_per_worker(start: WorkerStart) -> None:
    """Run by every Ray Train worker (``raydino.train.entry``), once ``start_worker`` has started its data stream."""
    _quiet_report_logs()
    plan = start.plan
    cfg = plan.cfg
    worker = _Worker(start)
    worker.restore()
    names = crop_names(cfg.data.crops.local_number)
    try:
        _train(worker, plan, names)
    finally:
        if worker.spot_watcher is not None:
            worker.spot_watcher.stop()
        if worker.stop_system_metrics is not None:
            worker.stop_system_metrics()
        if worker.logger is not None:
            _flush_tracking(worker.logger, plan)


def _flush_tracking(logger: BackgroundLogger, plan: WorkerPlan) -> None:
    """Wait (``tracking.flush_timeout_s`` at most) for the metrics MLflow has not confirmed; what is still unsent
    goes to a JSON-lines file in the run directory, named in one line (nothing dropped silently)."""
    records = logger.close(plan.cfg.tracking.flush_timeout_s)
    if not records:
        return
    from raydino.tracking import unsent_text

    name = f"unsent_metrics_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.jsonl"
    text = unsent_text(logger.uri, logger.run_id, records)
    path, filesystem = plan.run_dir_location
    filesystem = filesystem or pafs.LocalFileSystem()
    try:
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/{name}") as out:
            out.write(text.encode())
    except OSError as exc:
        _say(f"raydino: warning: {len(records)} metric points and tags never reached MLflow at {logger.uri}, and "
             f"writing them to {plan.run_dir}/{name} failed ({exc}); the last of them: {text[-2000:]}")
        return
    _say(f"raydino: warning: {len(records)} metric points and tags did not reach MLflow at {logger.uri} within "
         f"tracking.flush_timeout_s={plan.cfg.tracking.flush_timeout_s:g}: written to {plan.run_dir}/{name} "
         f"(send them when it answers: raydino replay-metrics {plan.run_dir}/{name})")


def _train(worker: _Worker, plan: WorkerPlan, names: list[str]) -> None:
    cfg = plan.cfg
    metrics: dict[str, float] = {}
    while worker.epoch < cfg.optim.epochs:
        started = time.perf_counter()
        while worker.batch_in_epoch < plan.steps_per_epoch:
            waiting = time.perf_counter()
            batch = next(worker.stream, None)
            if batch is None:
                raise RuntimeError(
                    f"the data stream ended at step {worker.step} of {worker.total_steps}: the dataset yielded fewer "
                    f"images than the steps planned from the files listed. Undecodable files are skipped (each is "
                    "logged as 'skipping undecodable image <path>'); remove them, or files deleted since the start, "
                    f"and run again to resume (last checkpoint: step {worker.last_checkpoint})."
                )
            computing = time.perf_counter()
            result = worker.train_step(batch, names)  # its metrics are floats: the device has finished the step
            metrics = result or metrics
            worker.step += 1
            worker.batch_in_epoch += 1
            worker.measure(computing - waiting, time.perf_counter() - computing)
            due = result is not None and worker.step % cfg.tracking.log_every_steps == 0
            if due and worker.batch_in_epoch < plan.steps_per_epoch:  # the last step logs with its epoch, at once
                worker.log({**metrics, **_kappa_metrics(worker.step_fn, metrics["teacher_temp"])})
            every = cfg.checkpoint.every_steps
            if every and worker.step % every == 0 and worker.batch_in_epoch < plan.steps_per_epoch:
                worker.save(metrics)
            worker.watch_preemption(metrics)
        epoch_metrics = worker.end_epoch(metrics, time.perf_counter() - started)
        if metrics and worker.step % cfg.tracking.log_every_steps == 0:
            epoch_metrics.update(_kappa_metrics(worker.step_fn, metrics["teacher_temp"]))
        else:  # this step's own metrics were not due: log only what the epoch adds
            epoch_metrics = {k: v for k, v in epoch_metrics.items() if k not in metrics}
        worker.log(epoch_metrics)
        worker.epoch += 1
        worker.batch_in_epoch = 0
        worker.save(epoch_metrics)
