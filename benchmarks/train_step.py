"""Images/s of the Ray Train loop (1 worker) against a plain PyTorch loop, same work.

Both run the same model, loss, optimiser and ``DINOStep`` on the same pre-made uint8
multi-crop batches (no augmentation in the timed path): the Ray side streams them from
a Ray Dataset through ``train_loop_per_worker`` (shard iteration, device transfer,
checkpoint per epoch included); the plain side loops over tensors in memory. Epoch
times after the first (warm-up) are compared; the figure is the ratio of medians.

The worker gets the preset's CPUs per worker (``scaling.cpus_per_worker``, 1 in
``cpu_demo``) unless ``--cpus`` says otherwise. When the worker's torch threads take
every core of the machine, Ray's own processes (raylet, GCS, Train controller, Ray
Data coordinator: about a seventh of a core in all, measured on 2 cores) run on the
cores the compute needs; the ratio then measures that share too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import torch
from mlflow import MlflowClient
from ray.data.extensions import ArrowTensorArray

from raydino.config import load_config
from raydino.data.augment import MultiCrop, crop_names
from raydino.data.clock import start_epoch_clock
from raydino.data.embedded import load_digits
from raydino.data.pipeline import epoch_stream
from raydino.models import normalize_crops
from raydino.step import DINOStep
from raydino.tracking import create_run
from raydino.train.driver import build_trainer
from raydino.train.loop import WorkerPlan


def premade_crops(cfg, n_images: int) -> dict[str, np.ndarray]:
    digits = load_digits("train", size=cfg.data.crops.global_size)
    images = [torch.from_numpy(digits.images[i % len(digits)]) for i in range(n_images)]
    views = MultiCrop(cfg.data.crops).crop_batch(images, seeds=range(n_images))
    return {name: view.numpy() for name, view in zip(crop_names(cfg.data.crops.local_number), views)}


def plain_epoch_seconds(cfg, crops: dict[str, np.ndarray], steps: int, epochs: int) -> list[float]:
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    bs, names = cfg.data.batch_size_per_worker, list(crops)
    tensors = {k: torch.from_numpy(v) for k, v in crops.items()}
    times, step = [], 0
    for _ in range(epochs):
        start = time.perf_counter()
        for b in range(steps):
            batch = [tensors[n][b * bs : (b + 1) * bs] for n in names]
            step_fn(normalize_crops(batch, "cpu"), step, steps * epochs)
            step += 1
        times.append(time.perf_counter() - start)
    return times


def ray_epoch_seconds(cfg, crops: dict[str, np.ndarray], steps: int, workdir: str) -> list[float]:
    table = pa.table({k: ArrowTensorArray.from_numpy(v) for k, v in crops.items()})
    ds = epoch_stream(ray.data.from_arrow(table), cfg.optim.epochs)  # as in training: one stream, all epochs
    uri = f"sqlite:///{workdir}/mlflow.db"
    run_id = create_run(uri, "bench", "train_step", {})
    clock = start_epoch_clock()
    trainer = build_trainer(
        cfg,
        ds,
        WorkerPlan(cfg, steps, clock, tracking_uri=uri, mlflow_run_id=run_id),
        ray.train.RunConfig(name="train_step_bench", storage_path=workdir),
    )
    trainer.fit()
    history = MlflowClient(uri).get_metric_history(run_id, "epoch_seconds")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--cpus", type=float, default=None, help="CPUs (torch threads) of the one worker (default: the preset's)"
    )
    args = parser.parse_args()
    cpus = args.cpus if args.cpus is not None else load_config().scaling.cpus_per_worker
    cfg = load_config(
        overrides=[
            "scaling.num_workers=1",
            f"scaling.cpus_per_worker={cpus}",
            f"optim.epochs={args.epochs}",
            "optim.warmup_epochs=0",
            "loss.warmup_teacher_temp_epochs=0",
            "optim.freeze_last_layer_epochs=0",
            "tracking.log_every_steps=100000",
            "data.shuffle_buffer_batches=0",
        ]
    )
    crops = premade_crops(cfg, args.steps * cfg.data.batch_size_per_worker)
    plain = plain_epoch_seconds(cfg, crops, args.steps, args.epochs)[1:]
    ray.init(num_cpus=int(cpus) + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as workdir:
        on_ray = ray_epoch_seconds(cfg, crops, args.steps, workdir)[1:]
    ray.shutdown()
    images = args.steps * cfg.data.batch_size_per_worker
    plain_rate, ray_rate = images / statistics.median(plain), images / statistics.median(on_ray)
    print(f"train_step  {cfg.model.name} (cpu_demo), batch {cfg.data.batch_size_per_worker}, "
          f"{args.steps} steps x {args.epochs - 1} timed epochs, {cpus:g} CPUs "
          f"(machine: {os.cpu_count()})")
    print(f"  plain PyTorch loop   median {plain_rate:7.1f} images/s  (epochs: {', '.join(f'{t:.1f}s' for t in plain)})")
    print(f"  Ray Train, 1 worker  median {ray_rate:7.1f} images/s  (epochs: {', '.join(f'{t:.1f}s' for t in on_ray)})")
    print(f"  ratio Ray / plain: {ray_rate / plain_rate:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
