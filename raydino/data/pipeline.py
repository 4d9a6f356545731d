"""The multi-crop stage: CPU actors turn source rows into fixed-shape uint8 crop columns.

Output rows: one ``(3, S, S)`` uint8 column per crop (names from ``crop_names``, global
crops first) plus ``label`` (int64). Crops stay uint8 (a quarter of float32's object-store
bytes); normalisation happens on the training device.

Reproducibility: each row is cropped under its own seed, derived from ``(seed, epoch,
row key)``, so crops do not depend on batching, block order, shuffling, the number of
actors or which actor got the row. The row key is the source's ``key`` column (see
``raydino.data.sources``); rows without one are keyed by a hash of their pixels.
Re-iterating the same Dataset gives the same crops: pass a different ``epoch`` (or seed)
to get fresh augmentations.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import ray.data
import torch

from raydino.config import CropsConfig
from raydino.data.augment import MultiCrop, crop_names
from raydino.data.sources import UNKNOWN_LABEL


def row_seed(seed: int, epoch: int, key: int) -> int:
    """A 63-bit torch seed from (seed, epoch, key), identical on every machine and Python process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _pixel_key(image: np.ndarray) -> int:
    """Fallback row key for sources without a ``key`` column: the image content (shape included)."""
    h = hashlib.blake2b(str(image.shape).encode(), digest_size=8)
    h.update(np.ascontiguousarray(image).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _chw(image: np.ndarray) -> torch.Tensor:
    """uint8 CHW tensor (HW accepted as one channel); a copy, since Ray hands read-only buffers."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"multi-crop expects uint8 images, got {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"multi-crop expects images as (C, H, W) with C in (1, 3) or (H, W), got shape {array.shape}")
    return torch.from_numpy(array.copy())


@ray.remote(num_cpus=0)
class EpochClock:
    """The current training epoch, set by the training loop and read by the crop actors.

    A Dataset is iterated once per epoch with the same transforms; reading the epoch here
    gives every epoch fresh (and still reproducible) crops without rebuilding the pipeline.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._epoch = epoch

    def set(self, epoch: int) -> None:
        self._epoch = epoch

    def get(self) -> int:
        return self._epoch


class MultiCropStage:
    """Callable class for ``map_batches`` on an actor pool: builds the transforms once per actor."""

    def __init__(
        self, crops: CropsConfig, seed: int, epoch: int = 0, torch_threads: int = 1, epoch_clock: Any = None
    ) -> None:
        self.torch_threads = torch_threads
        self.multicrop = MultiCrop(crops)
        self.names = crop_names(crops.local_number)
        self.sizes = [crops.global_size] * 2 + [crops.local_size] * crops.local_number
        self.seed = seed
        self.epoch = epoch
        self.epoch_clock = epoch_clock

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        epoch = self.epoch if self.epoch_clock is None else ray.get(self.epoch_clock.get.remote())
        keys = batch["key"].tolist() if "key" in batch else [_pixel_key(np.asarray(im)) for im in images]
        labels = np.asarray(batch["label"], dtype=np.int64) if "label" in batch else np.full(n, UNKNOWN_LABEL, np.int64)
        columns: list[list[np.ndarray]] = [[] for _ in self.names]
        threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)  # per-image ops are tiny: intra-op threads only oversubscribe
        try:
            with torch.random.fork_rng(devices=[]):
                for image, key in zip(images, keys):
                    torch.manual_seed(row_seed(self.seed, epoch, int(key)))
                    for column, view in zip(columns, self.multicrop(_chw(image))):
                        column.append(view.numpy())
        finally:
            torch.set_num_threads(threads)
        out = {
            name: np.stack(column) if n else np.empty((0, 3, size, size), dtype=np.uint8)
            for name, column, size in zip(self.names, columns, self.sizes)
        }
        out["label"] = labels
        return out


def multicrop_dataset(
    ds: ray.data.Dataset,
    crops: CropsConfig,
    seed: int,
    num_actors: int,
    batch_size: int,
    *,
    epoch: int = 0,
    cpus_per_actor: float = 1.0,
    epoch_clock: Any = None,
) -> ray.data.Dataset:
    """Apply DINO multi-crop to rows ``{"image": uint8 CHW, "label"?, "key"?}`` on ``num_actors`` CPU actors.

    ``batch_size`` is the number of images per actor call (not the training batch). With an
    ``EpochClock`` handle the epoch is read from it for every batch instead of ``epoch``. Budget
    ``num_actors * cpus_per_actor`` logical CPUs besides the train workers and the decode
    tasks: an under-sized cluster stalls rather than failing.
    """
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return ds.map_batches(
        MultiCropStage,
        fn_constructor_kwargs={
            "crops": crops,
            "seed": seed,
            "epoch": epoch,
            "torch_threads": max(1, int(cpus_per_actor)),
            "epoch_clock": epoch_clock,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
    )
