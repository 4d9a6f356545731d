"""The multi-crop stage: CPU actors turn source rows into fixed-shape uint8 crop columns.

Output rows: one ``(3, S, S)`` uint8 column per crop (names from ``crop_names``, global
crops first) plus ``label`` and ``epoch`` (int64). Crops stay uint8 (a quarter of float32's object-store
bytes); normalisation happens on the training device.

Each actor call crops a whole batch at once (``MultiCrop.crop_batch``: parameters drawn
per image, each augmentation step applied once per batch).

Reproducibility: each row is cropped under its own seed, derived from ``(seed, epoch,
row key)``, so crops do not depend on batching, block order, shuffling, the number of
actors or which actor got the row. The row key is the source's ``key`` column (see
``raydino.data.sources``); rows without one are keyed by a hash of their pixels.
Re-iterating the same Dataset gives the same crops: pass a different ``epoch`` (or seed)
to get fresh augmentations.

Training streams all its epochs through one execution (``epoch_stream``): Ray Data starts
an actor pool per execution, and on small datasets restarting the crop actors every epoch
(each imports torch) cost more than half of every epoch. Rows carry their epoch index.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import ray
import ray.data
from ray.data.expressions import lit

from raydino.config import CropsConfig
from raydino.data.sources import UNKNOWN_LABEL

if TYPE_CHECKING:
    import torch

# torch and torchvision are imported where they are used, not here: every process that
# unpickles this Dataset's plan (Ray Data's split coordinator, a sweep's trial driver)
# imports this module, and only the crop actors need them (seconds of CPU each).

EPOCH_COLUMN = "epoch"
T = TypeVar("T")


class EarlyStart(Iterator[T], Generic[T]):
    """An iterator whose first item is asked for at once, in a background thread.

    A Ray Data stream starts its executor and its crop actors (a process each, seconds of imports) only when
    it is first iterated; a training worker that starts its stream this way builds its model meanwhile,
    instead of first building it and then waiting for the actors. Later items come from the caller's
    thread, one at a time, as before; an error of the first fetch is raised by the first ``next``.
    """

    def __init__(self, items: Iterator[T]) -> None:
        self._items = items
        self._first: list[tuple[str, Any]] = []
        self._fetching: threading.Thread | None = threading.Thread(
            target=self._fetch_first, name="raydino-first-batch", daemon=True  # never holds up a process's exit
        )
        self._fetching.start()

    def _fetch_first(self) -> None:
        try:
            self._first.append(("item", next(self._items)))
        except StopIteration:
            self._first.append(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            self._first.append(("error", exc))

    def __next__(self) -> T:
        if self._fetching is None:
            return next(self._items)
        self._fetching.join()
        self._fetching = None
        kind, value = self._first.pop()
        if kind == "end":
            raise StopIteration
        if kind == "error":
            raise value
        return value


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
    import torch

    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"multi-crop expects uint8 images, got {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"multi-crop expects images as (C, H, W) with C in (1, 3) or (H, W), got shape {array.shape}")
    return torch.from_numpy(array.copy())


def epoch_stream(
    ds: ray.data.Dataset,
    epochs: int,
    block_order_seed: int | None = None,
    pass_dataset: Callable[[int], ray.data.Dataset] | None = None,
) -> ray.data.Dataset:
    """``epochs`` passes over ``ds`` as one Dataset, each row tagged with its pass index.

    One execution serves the whole run, so downstream actors (multi-crop) start once.
    Every pass re-reads the source (file sources reshuffle their file order). Ray Data
    runs a few passes at once and interleaves their blocks, so each pass needs its own
    order: ``block_order_seed`` gives in-memory sources (whose blocks already exist) a
    different block order per pass; file sources get theirs from their file shuffle;
    ``pass_dataset(e)`` (shard sets) builds pass ``e`` in its own seeded order.
    Every image still appears exactly once per pass.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    passes = []
    for e in range(epochs):
        if pass_dataset is not None:
            one = pass_dataset(e)
        else:
            one = ds if block_order_seed is None else ds.randomize_block_order(seed=block_order_seed * 100_003 + e)
        # an expression, not a Python function: the tasks that run it need not import raydino (torch)
        passes.append(one.with_column(EPOCH_COLUMN, lit(e)))
    return passes[0].union(*passes[1:]) if epochs > 1 else passes[0]


class MultiCropStage:
    """Callable class for ``map_batches`` on an actor pool: builds the transforms once per actor.

    A row's epoch is ``epoch`` (or the value of ``raydino.data.clock.EpochClock``), plus the row's ``epoch`` column
    when it has one (``epoch_stream``): a run resumed at epoch k sets the clock to k and
    streams passes 0, 1, ... again as epochs k, k + 1, ...
    """

    def __init__(
        self,
        crops: CropsConfig,
        seed: int,
        epoch: int = 0,
        torch_threads: int = 1,
        epoch_clock: Any = None,
        meter: Any = None,
    ) -> None:
        from raydino.data.augment import MultiCrop, crop_names

        self.meter = meter
        self.actor_id = ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
        self.torch_threads = torch_threads
        self.multicrop = MultiCrop(crops)
        self.names = crop_names(crops.local_number)
        self.seed = seed
        self.epoch = epoch
        self.epoch_clock = epoch_clock

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        base = self.epoch if self.epoch_clock is None else ray.get(self.epoch_clock.get.remote(), timeout=60)
        epochs = base + (np.asarray(batch[EPOCH_COLUMN], dtype=np.int64) if EPOCH_COLUMN in batch else np.zeros(n, np.int64))
        keys = batch["key"].tolist() if "key" in batch else [_pixel_key(np.asarray(im)) for im in images]
        labels = np.asarray(batch["label"], dtype=np.int64) if "label" in batch else np.full(n, UNKNOWN_LABEL, np.int64)
        seeds = [row_seed(self.seed, epoch, int(key)) for key, epoch in zip(keys, epochs.tolist())]
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)  # per-image ops are tiny: intra-op threads only oversubscribe
        started = time.perf_counter()
        try:
            views = self.multicrop.crop_batch([_chw(image) for image in images], seeds)
        finally:
            torch.set_num_threads(threads)
        if self.meter is not None:
            self.meter.add.remote(self.actor_id, n, time.perf_counter() - started)
        out = {name: view.numpy() for name, view in zip(self.names, views)}
        out["label"] = labels
        out[EPOCH_COLUMN] = epochs
        return out


def multicrop_dataset(
    ds: ray.data.Dataset,
    crops: CropsConfig,
    seed: int,
    num_actors: int | tuple[int, int],
    batch_size: int,
    *,
    epoch: int = 0,
    cpus_per_actor: float = 1.0,
    actor_resources: dict[str, float] | None = None,
    epoch_clock: Any = None,
    meter: Any = None,
) -> ray.data.Dataset:
    """Apply DINO multi-crop to rows ``{"image": uint8 CHW, "label"?, "key"?}`` on a pool of CPU actors:
    ``num_actors`` of them, or with ``(min, max)`` Ray Data's autoscaling actor pool
    (``ActorPoolStrategy(min_size, max_size)``, Ray 2.60), which adds actors while their input
    queues up and the consumers keep up, up to ``max``. A ``raydino.data.clock.CropMeter`` handle
    counts the images and seconds of every actor.

    ``batch_size`` is the number of images per actor call (not the training batch);
    ``actor_resources`` are custom Ray resources each actor also needs (to place the actors on
    CPU-only nodes of a cluster). With an
    ``EpochClock`` handle the epoch is read from it for every batch instead of ``epoch``. Budget
    ``num_actors * cpus_per_actor`` logical CPUs besides the train workers and the decode
    tasks: an under-sized cluster stalls rather than failing.
    """
    low, high = (num_actors, num_actors) if isinstance(num_actors, int) else num_actors
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= min <= max crop actors, got {num_actors}")
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
            "meter": meter,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=low) if low == high else ray.data.ActorPoolStrategy(
            min_size=low, max_size=high
        ),
        num_cpus=cpus_per_actor,
        **({"resources": dict(actor_resources)} if actor_resources else {}),
    )
