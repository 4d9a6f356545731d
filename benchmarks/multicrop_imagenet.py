"""Multi-crop at ImageNet geometry: JPEG files -> decode -> 2x224 + 10x96 crops, images/s per core.

Run as ``python benchmarks/multicrop.py --geometry imagenet`` (or this file). The files are JPEGs
of ImageNet's typical size (333-427 x 440-560 px) cut from real photos
(``raydino.commands.rehearsal.imagenet_geometry_jpegs``); the crops are the ``imagenet_vit_small``
preset's (DINO's augmentations). Three pipelines, each with ``--workers`` worker processes, over
the same files, timed after their first epoch (start-up excluded):

- raydino: Ray Data reads the files and decodes them in tasks, the multi-crop stage crops them in
  batches on ``--workers`` actors (``imagefolder_dataset`` + ``multicrop_dataset``, as training);
- the same decode and crop code in a torch DataLoader, image by image (``MultiCrop.__call__``);
- DINO's own pipeline: ``main_dino.py``'s ``DataAugmentationDINO`` (PIL and torchvision's v1
  transforms, image by image, float output) over ``ImageFolder`` in a DataLoader, transcribed here.

Per core = images/s / the cores a pipeline occupies, never more than the machine has: ``--workers``
for the DataLoaders, ``--workers`` + 1 for Ray Data (its decode tasks run beside the crop actors).
The default gives every pipeline the whole machine (``--workers`` = its cores), as one would run
it: each then has the same cores, and per core is images/s over them. With fewer workers than
cores a pipeline leaves cores idle, and the ratio then depends on how it is charged for them; the
images per busy CPU second (the whole machine's, from /proc/stat) are printed beside it either way.
From raydino's figure it prints how many cores (and crop actors) one GPU needs to be fed at
``--gpu-images-per-second`` (a measured ``benchmarks/gpu_step.py`` figure, or a published one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray
import ray.data
import torch
from torch.utils.data import DataLoader, Dataset

from raydino.commands.rehearsal import imagenet_geometry_jpegs
from raydino.config import load_config
from raydino.data.augment import MultiCrop
from raydino.data.pipeline import epoch_stream, multicrop_dataset
from raydino.data.sources import decode_image, imagefolder_dataset


def dino_augmentation(local_number: int):
    """``DataAugmentationDINO`` of facebookresearch/dino ``main_dino.py`` (default scales), verbatim in
    behaviour: PIL images in, 2 global + ``local_number`` local normalised float tensors out."""
    import random

    from PIL import ImageFilter, ImageOps
    from torchvision import transforms

    class GaussianBlur:
        def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
            self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

        def __call__(self, img):
            if random.random() > self.prob:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))

    class Solarization:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return ImageOps.solarize(img) if random.random() < self.p else img

    flip_and_color_jitter = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ])
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = transforms.InterpolationMode.BICUBIC
    global1 = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_color_jitter, GaussianBlur(1.0), normalize])
    global2 = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize])
    local = transforms.Compose([transforms.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic),
                                flip_and_color_jitter, GaussianBlur(p=0.5), normalize])

    def crops(image):
        return [global1(image), global2(image), *(local(image) for _ in range(local_number))]

    return crops


class _DinoFolder(Dataset):
    def __init__(self, files: list[Path], local_number: int) -> None:
        self.files, self.augment = files, dino_augmentation(local_number)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from PIL import Image

        with open(self.files[i], "rb") as f:
            image = Image.open(f).convert("RGB")  # torchvision's pil_loader
        return self.augment(image)


class _RaydinoFolder(Dataset):
    def __init__(self, files: list[Path], multicrop: MultiCrop) -> None:
        self.files, self.multicrop = files, multicrop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.multicrop(torch.from_numpy(decode_image(self.files[i].read_bytes())))


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, every core: /proc/stat, not idle or iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _steady_rate(sizes: Iterable[int], epoch_rows: int) -> tuple[float, float]:
    """(images/s, images per busy CPU second of the whole machine) after the first epoch's worth of images.
    The second counts everything a pipeline makes the machine do (Ray's own processes, the DataLoader's main
    process), so the machine must run nothing else."""
    total, warm_at, warm_rows, warm_busy = 0, None, 0, 0.0
    for n in sizes:
        total += n
        if warm_at is None and total >= epoch_rows:
            warm_at, warm_rows, warm_busy = time.perf_counter(), total, _busy_seconds()
    images = total - warm_rows
    return images / (time.perf_counter() - warm_at), images / max(_busy_seconds() - warm_busy, 1e-9)


def _loader(dataset: Dataset, workers: int, batch: int, epochs: int) -> Iterable[int]:
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=True, shuffle=True)
    for _ in range(epochs):
        for crops in loader:
            yield len(crops[0])


def _ray(root: Path, cfg, workers: int, batch: int, epochs: int) -> Iterable[int]:
    source = imagefolder_dataset(root)
    ds = multicrop_dataset(epoch_stream(source.dataset, epochs, None), cfg.data.crops, 0, workers, batch)
    for crops in ds.iter_batches(batch_size=batch, batch_format="numpy"):
        yield len(crops["global_0"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes per pipeline (crop actors for Ray); default: this machine's cores")
    parser.add_argument("--images-per-class", type=int, default=48, help="JPEGs per class (two classes)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="images per DataLoader batch and per crop-actor call")
    parser.add_argument("--preset", default="imagenet_vit_small")
    parser.add_argument("--gpu-images-per-second", type=float, default=None,
                        help="training images/s of one GPU to feed (default: print the formula only)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the steady state is timed after the first epoch")
    cfg = load_config(preset=args.preset)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="raydino-imagenet-geometry-") as tmp:
        root = imagenet_geometry_jpegs(Path(tmp), args.images_per_class)
        files = sorted(root.rglob("*.jpg"))
        ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        rates: dict[str, list[float]] = {"raydino (Ray Data)": [], "raydino code, DataLoader": [], "DINO's pipeline": []}
        per_cpu: dict[str, list[float]] = {name: [] for name in rates}
        for _ in range(args.rounds):
            runs = {
                "raydino (Ray Data)": lambda: _ray(root, cfg, args.workers, args.batch, args.epochs),
                "raydino code, DataLoader": lambda: _loader(_RaydinoFolder(files, MultiCrop(cfg.data.crops)), args.workers,
                                                            args.batch, args.epochs),
                "DINO's pipeline": lambda: _loader(_DinoFolder(files, cfg.data.crops.local_number), args.workers,
                                                   args.batch, args.epochs),
            }
            for name, run in runs.items():
                rate, per_busy = _steady_rate(run(), len(files))
                rates[name].append(rate)
                per_cpu[name].append(per_busy)
            print("  round: " + ", ".join(f"{k} {v[-1]:.1f} images/s ({per_cpu[k][-1]:.1f} per busy CPU s)"
                                          for k, v in rates.items()), flush=True)
        ray.shutdown()
    crops = cfg.data.crops
    machine = os.cpu_count() or 1
    print(f"multicrop at ImageNet geometry: {len(files)} JPEGs (333-427 x 440-560 px), 2x{crops.global_size}+"
          f"{crops.local_number}x{crops.local_size} crops ({args.preset}), {args.workers} worker(s) each "
          f"(+1 CPU for Ray Data's decode tasks), median of {args.rounds} rounds, machine {machine} CPUs")
    dino = rates["DINO's pipeline"]
    # the cores each pipeline occupies (Ray: its crop actors plus the decode tasks), at most the machine's
    cores = {name: min(machine, args.workers + (name == "raydino (Ray Data)")) for name in rates}
    per_core: dict[str, float] = {}
    for name, values in rates.items():
        median = statistics.median(values)
        per_core[name] = median / cores[name]
        ratio = statistics.median(v / d for v, d in zip(values, dino))
        measured = statistics.median(per_cpu[name])
        measured_ratio = statistics.median(v / d for v, d in zip(per_cpu[name], per_cpu["DINO's pipeline"]))
        # the figure: per core against DINO's, the median over rounds of each round's ratio
        core_ratio = statistics.median(v / cores[name] / (d / cores["DINO's pipeline"]) for v, d in zip(values, dino))
        print(f"  {name:26s} {median:7.1f} images/s on {cores[name]} core(s): {per_core[name]:6.1f} per core, "
              f"ratio to DINO's {core_ratio:.2f} (images/s ratio {ratio:.2f}); measured: {measured:6.1f} "
              f"images per busy CPU second, ratio to DINO's {measured_ratio:.2f}")
    per_core = per_core["raydino (Ray Data)"]
    if args.gpu_images_per_second:
        needed = args.gpu_images_per_second / per_core
        print(f"  one GPU at {args.gpu_images_per_second:.0f} images/s needs about {needed:.0f} CPU cores of "
              "decoding and multi-crop at this per-core rate")
    else:
        print(f"  cores per GPU = (GPU training images/s) / {per_core:.1f}; pass --gpu-images-per-second")


if __name__ == "__main__":
    main()
