"""Images/s of the Ray Data multi-crop stage against a torch DataLoader doing the same work.

Both apply the same torchvision v2 MultiCrop (2 global + M local crops, uint8 out) with
the same number of worker processes, on the same in-memory images; both are timed on
a second, warm pass (actor / worker start-up excluded), median over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from raydino.config import load_config  # noqa: E402
from raydino.data.augment import MultiCrop  # noqa: E402
from raydino.data.embedded import ArrayDataset, load_digits  # noqa: E402
from raydino.data.pipeline import multicrop_dataset  # noqa: E402
from raydino.data.sources import array_dataset  # noqa: E402


class _Crops(Dataset):
    def __init__(self, data: ArrayDataset, multicrop: MultiCrop) -> None:
        self.data, self.multicrop = data, multicrop

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.multicrop(torch.from_numpy(self.data.images[i]))


def _time_loader(loader: DataLoader) -> float:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[0])
    return n / (time.perf_counter() - start)


def _time_ray(ds: ray.data.Dataset, batch_size: int) -> float:
    start, n = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(batch["global_0"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray Data actors")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="copies of digits (1,347 images each)")
    parser.add_argument("--preset", default="cpu_demo")
    args = parser.parse_args()
    cfg = load_config(preset=args.preset)
    digits = load_digits("train", size=cfg.data.crops.global_size)
    data = ArrayDataset(np.concatenate([digits.images] * args.repeat), np.concatenate([digits.labels] * args.repeat), digits.classes)

    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = multicrop_dataset(array_dataset(data, rows_per_block=256).dataset, cfg.data.crops, 0, args.workers, args.batch)
    loader = DataLoader(
        _Crops(data, MultiCrop(cfg.data.crops)), batch_size=args.batch, num_workers=args.workers, persistent_workers=True
    )
    _time_loader(loader)
    _time_ray(ds, args.batch)
    ray_rates, loader_rates, ratios = [], [], []
    for _ in range(args.rounds):
        loader_rates.append(_time_loader(loader))
        ray_rates.append(_time_ray(ds, args.batch))
        ratios.append(ray_rates[-1] / loader_rates[-1])
    print(f"multicrop  {len(data)} images  crops=2x{cfg.data.crops.global_size}px+{cfg.data.crops.local_number}x"
          f"{cfg.data.crops.local_size}px  workers={args.workers}  rounds={args.rounds}")
    print(f"  DataLoader  median {statistics.median(loader_rates):8.1f} images/s")
    print(f"  Ray Data    median {statistics.median(ray_rates):8.1f} images/s")
    print(f"  median ratio Ray Data / DataLoader: {statistics.median(ratios):.3f}  (target >= 1.0)")
    ray.shutdown()


if __name__ == "__main__":
    main()
