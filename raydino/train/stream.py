"""What a training worker does first: find its position and start its data stream.

Ray Data starts a stream's executor and its crop actors (a process each, seconds of imports) only when
the stream is first iterated. This module imports nothing heavy (no torchvision, timm, scipy or MLflow:
``raydino.train.entry`` calls ``start_worker`` before it imports ``raydino.train.loop``), so a worker's
crop actors start while it imports the training loop and builds its model, not after.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydino.config import Config
from raydino.data.pipeline import EarlyStart
from raydino.eval.data import EvalData
from raydino.train.checkpoint import TrainState, read_checkpoint


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker receives from the driver (``train_loop_config={"plan": ray.put(plan)}``)."""

    cfg: Config
    steps_per_epoch: int
    epoch_clock: Any
    """``raydino.data.clock.EpochClock`` handle: the epoch the crop actors seed from."""
    eval_data: EvalData | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    resume_from: ray.train.Checkpoint | None = None
    """The newest checkpoint in the run's storage, for a restore when Ray Train has none on record: a run
    stopped (SIGTERM, Ctrl-C) after a checkpoint was written but before Ray's controller recorded it
    would otherwise start again from step 0 (Ray Train v2's documented pattern for resuming)."""
    run_dir: str = ""
    """The run's directory (local path or URI), as the user sees it: where unsent metrics are written."""
    run_dir_location: tuple[str, Any] = ("", None)
    """``run_dir`` as (path, pyarrow filesystem or None for a local path), resolved by the driver."""
    tracking_env: dict[str, str] = field(default_factory=dict)
    """The driver's ``MLFLOW_*`` variables (credentials, request retries and timeouts), set on rank 0 before it
    logs: workers on other nodes do not inherit the driver's environment."""


def download_checkpoint(checkpoint: Any, directory: str | os.PathLike[str]) -> Path:
    """A Ray Train ``Checkpoint`` copied into a local ``directory``, retried with backoff on the object-store
    errors Ray Data retries (``DataContext.retried_io_errors``: SlowDown, 503, internal and connection
    failures). The S3 client retries each request, but a body cut short mid-download surfaces as an error
    the client does not retry (seen under injected faults: "Failed to flush response stream")."""
    from ray._common.retry import call_with_retry  # Ray Train's own retry of checkpoint uploads

    errors = list(ray.data.DataContext.get_current().retried_io_errors)
    target = str(directory)
    return Path(call_with_retry(lambda: checkpoint.to_directory(target), "download the checkpoint", match=errors,
                                max_attempts=5, max_backoff_s=8))


@contextlib.contextmanager
def checkpoint_directory(checkpoint: Any) -> Iterator[Path]:
    """A Ray Train ``Checkpoint`` as a local directory: its own path on a local disk, else a retried download
    (``download_checkpoint``) into a temporary directory removed afterwards."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="raydino-restore-") as tmp:
        yield download_checkpoint(checkpoint, tmp)


@dataclass
class WorkerStart:
    """A worker's plan, the checkpoint it resumes from (None: step 0), its position and its started stream."""

    plan: WorkerPlan
    device: torch.device
    state: TrainState | None
    step: int
    epoch: int
    batch_in_epoch: int
    stream: Iterator[dict[str, torch.Tensor]]


def start_worker(loop_config: dict[str, Any]) -> WorkerStart:
    """Fetch the plan (an object reference, see ``raydino.train.entry``), read the checkpoint to resume from
    (Ray Train's latest, else the newest in storage) and start the data stream at its position."""
    plan: WorkerPlan = ray.get(loop_config["plan"])
    torch.set_num_threads(max(1, int(plan.cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint() or plan.resume_from
    state = None
    if checkpoint is not None:
        with checkpoint_directory(checkpoint) as directory:
            state = read_checkpoint(directory, map_location=device)
    step, epoch, batch_in_epoch = state.position(plan.steps_per_epoch) if state is not None else (0, 0, 0)
    return WorkerStart(plan, device, state, step, epoch, batch_in_epoch, data_stream(plan, epoch, device))


def data_stream(plan: WorkerPlan, epoch: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """One iterator for the whole run: one Ray Data execution, crop actors started once, at once
    (``EarlyStart``). After a resume the stream starts afresh at ``epoch``; the steps already trained are
    not replayed."""
    cfg, rank = plan.cfg, ray.train.get_context().get_world_rank()
    if rank == 0:  # this attempt streams epochs epoch, epoch + 1, ... (see EpochClock)
        ray.get(plan.epoch_clock.set.remote(epoch), timeout=60)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no worker starts the data before the clock shows it
    batch_size = cfg.data.batch_size_per_worker
    return EarlyStart(iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            prefetch_batches=2,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_batches * batch_size or None,
            local_shuffle_seed=cfg.seed + 1000 * epoch + rank,
            device="cpu",
            pin_memory=device.type == "cuda",  # page-locked batches: normalize_crops copies non_blocking
        )
    ))
