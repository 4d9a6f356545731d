"""Images/s of the Ray Data multi-crop stage against a torch DataLoader doing the same work.

Both produce the same DINO views (torchvision v2 MultiCrop: 2 global + M local crops,
uint8 out) with the same number of worker processes from the same in-memory images, over
several epochs the way training consumes them: Ray Data as one stream of all epochs
(``epoch_stream``, the crop actors start once), the DataLoader with persistent workers.
The DataLoader runs the pipelines image by image, as DINO's and most training code does;
the Ray Data stage gets a batch per call and applies each augmentation step once per batch
(``MultiCrop.crop_batch``; identical crops for the same seeds, tested bit for bit).
Two figures per round, each a ratio Ray Data / DataLoader:

- steady state: images/s after the first epoch's worth of images (start-up excluded);
- whole run: images/s including start-up (actors import torch; DataLoader workers fork).

A third figure separates batching from Ray Data itself: Ray Data against a DataLoader
whose workers run the same batched code (one ``crop_batch`` call per loader batch),
steady state. Each round starts all three afresh; the figures are medians over rounds. The number of
workers defaults to the preset's ``data.num_crop_actors``, the batch (images per actor
call, and per DataLoader batch) to its ``data.crop_batch_size``. With as many workers as the
machine has cores, Ray's own processes (raylet, GCS, the driver's streaming executor)
take their share from the crop actors; the DataLoader has no such processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import ray
import ray.data
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from raydino.config import load_config
from raydino.data.augment import MultiCrop
from raydino.data.embedded import ArrayDataset, load_digits
from raydino.data.pipeline import epoch_stream, multicrop_dataset
from raydino.data.sources import array_dataset


class _Crops(Dataset):
    def __init__(self, data: ArrayDataset, multicrop: MultiCrop) -> None:
        self.data, self.multicrop = data, multicrop

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.multicrop(torch.from_numpy(self.data.images[i]))


def _rates(batch_sizes: Iterable[int], epoch_rows: int) -> tuple[float, float]:
    """(steady-state, whole-run) images/s of a stream of batches, timed as it is consumed."""
    start = time.perf_counter()
    total, warm_at, warm_rows = 0, None, 0
    for n in batch_sizes:
        total += n
        if warm_at is None and total >= epoch_rows:
            warm_at, warm_rows = time.perf_counter(), total
    end = time.perf_counter()
    return (total - warm_rows) / (end - warm_at), total / (end - start)


class _BatchedCrops(Dataset):
    """Indexed by a list of indices (a whole batch): crops them with one ``crop_batch`` call."""

    def __init__(self, data: ArrayDataset, multicrop: MultiCrop) -> None:
        self.data, self.multicrop = data, multicrop

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: list[int]) -> list[torch.Tensor]:
        return self.multicrop.crop_batch([torch.from_numpy(self.data.images[i]) for i in indices], indices)


def _loader_sizes(
    data: ArrayDataset, cfg, workers: int, batch: int, epochs: int, batched: bool = False
) -> Iterable[int]:
    if batched:
        sampler = BatchSampler(SequentialSampler(range(len(data))), batch, drop_last=False)
        loader = DataLoader(
            _BatchedCrops(data, MultiCrop(cfg.data.crops)),
            sampler=sampler,
            batch_size=None,
            num_workers=workers,
            persistent_workers=True,
        )
    else:
        loader = DataLoader(
            _Crops(data, MultiCrop(cfg.data.crops)), batch_size=batch, num_workers=workers, persistent_workers=True
        )
    for _ in range(epochs):
        for crops in loader:
            yield len(crops[0])


def _ray_sizes(data: ArrayDataset, cfg, workers: int, batch: int, epochs: int) -> Iterable[int]:
    stream = epoch_stream(array_dataset(data).dataset, epochs, block_order_seed=0)
    ds = multicrop_dataset(stream, cfg.data.crops, 0, workers, batch)
    for crops in ds.iter_batches(batch_size=batch, batch_format="numpy"):
        yield len(crops["global_0"])


def main() -> None:
    if "--geometry" in sys.argv:  # --geometry imagenet: JPEG files at ImageNet's size (multicrop_imagenet.py)
        at = sys.argv.index("--geometry")
        geometry, rest = sys.argv[at + 1], sys.argv[1:at] + sys.argv[at + 2:]
        if geometry == "imagenet":
            from multicrop_imagenet import main as imagenet_main

            imagenet_main(rest)
            return
        if geometry != "digits":
            raise SystemExit(f"--geometry: digits (default) or imagenet, not {geometry!r}")
        sys.argv = [sys.argv[0], *rest]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers = Ray Data actors (default: the preset's)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="images per actor call = per DataLoader batch (default: the preset's)"
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="copies of digits (1,347 images each) per epoch")
    parser.add_argument("--preset", default="cpu_demo")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the steady state is timed after the first epoch")
    cfg = load_config(preset=args.preset)
    if args.workers is None:
        args.workers = cfg.data.num_crop_actors
    if args.batch is None:
        args.batch = cfg.data.crop_batch_size
    digits = load_digits("train", size=cfg.data.crops.global_size)
    data = ArrayDataset(
        np.concatenate([digits.images] * args.repeat), np.concatenate([digits.labels] * args.repeat), digits.classes
    )
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    steady, whole, same_code = [], [], []
    for _ in range(args.rounds):
        loader = _rates(_loader_sizes(data, cfg, args.workers, args.batch, args.epochs), len(data))
        batched = _rates(_loader_sizes(data, cfg, args.workers, args.batch, args.epochs, batched=True), len(data))
        on_ray = _rates(_ray_sizes(data, cfg, args.workers, args.batch, args.epochs), len(data))
        steady.append((on_ray[0], loader[0]))
        whole.append((on_ray[1], loader[1]))
        same_code.append((on_ray[0], batched[0]))
        print(f"  round: steady Ray {on_ray[0]:.0f} / DataLoader {loader[0]:.0f} images/s"
              f" (batched DataLoader {batched[0]:.0f}); whole run Ray {on_ray[1]:.0f} / DataLoader {loader[1]:.0f}",
              flush=True)
    ray.shutdown()
    print(f"multicrop  {len(data)} images x {args.epochs} epochs  crops=2x{cfg.data.crops.global_size}px+"
          f"{cfg.data.crops.local_number}x{cfg.data.crops.local_size}px  workers={args.workers}  batch={args.batch}  "
          f"rounds={args.rounds}  (machine: {os.cpu_count()} CPUs)")
    for label, pairs, note in (
        ("steady state", steady, "(target >= 1.0)"),
        ("whole run   ", whole, "(target >= 1.0)"),
        ("steady, DataLoader batched too", same_code, "(Ray Data's own cost or gain)"),
    ):
        ray_rate = statistics.median(r for r, _ in pairs)
        loader_rate = statistics.median(d for _, d in pairs)
        ratio = statistics.median(r / d for r, d in pairs)
        print(f"  {label}  DataLoader median {loader_rate:6.1f}  Ray Data median {ray_rate:6.1f} images/s"
              f"  ratio {ratio:.3f}  {note}")


if __name__ == "__main__":
    main()
