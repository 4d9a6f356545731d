"""Held-out labelled images for evaluation, as in-memory arrays at the global crop size."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow.fs as pafs
import ray.data
import torch
from torchvision.transforms import v2

from raydino.config import Config
from raydino.config.registry import DATA_SOURCES
from raydino.data.embedded import load_embedded
from raydino.data.sources import decode_image, list_imagefolder, sample_listing
from raydino.eval.data import EvalData
from raydino.launch.plan import standard_eval_paths
from raydino.stores.locations import read_file

logger = logging.getLogger(__name__)


def _subsample(images: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if len(labels) <= limit:
        return images, labels
    idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=limit, replace=False))
    return images[idx], labels[idx]


def _resized_rows(
    entries: Iterable[tuple[str, int, Callable[[], bytes]]], transform: v2.Transform, size: int
) -> dict[str, np.ndarray]:
    """``(name, label, read)`` -> rows of (3, size, size) uint8 images and labels; one that cannot be read or
    decoded is dropped (and logged): the evaluation set is then that much smaller."""
    images, labels = [], []
    for name, label, read in entries:
        try:
            image = decode_image(read())
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            logger.warning("raydino: evaluation skips undecodable image %s (%s)", name, exc)
            continue
        images.append(transform(torch.from_numpy(image)).numpy())
        labels.append(int(label))
    return {"image": np.stack(images) if images else np.empty((0, 3, size, size), dtype=np.uint8),
            "label": np.asarray(labels, dtype=np.int64)}


def _eval_transform(size: int) -> v2.Transform:
    return v2.Compose([v2.RGB(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def _read_and_decode(size: int, filesystem: pafs.FileSystem | None):
    """Read and decode files to (3, size, size) uint8 (shorter side resized, centre crop)."""
    transform = _eval_transform(size)

    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = ((str(p), label, lambda p=p: read_file(str(p), filesystem))
                   for p, label in zip(batch["path"], batch["label"]))
        return _resized_rows(entries, transform, size)

    return fn


def sample_imagefolder(
    path: str, limit: int, seed: int
) -> tuple[list[str], list[int], int, pafs.FileSystem | None]:
    """A seeded, class-stratified sample of at most ``limit`` image paths of an ImageFolder, with their
    labels, the number of classes and the filesystem to read them through (None: local): from the
    listing alone, nothing is read."""
    root, files = list_imagefolder(path)
    picked = sample_listing(list(files.values()), limit, seed)
    return [p for _, p in picked], [label for label, _ in picked], len(files), root.filesystem


def decode_files(
    paths: list[str], labels: list[int], size: int, filesystem: pafs.FileSystem | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode exactly ``paths`` (in Ray tasks), resized and centre-cropped to ``size``."""
    table = ray.data.from_items([{"path": p, "label": lab} for p, lab in zip(paths, labels)])
    rows = table.map_batches(_read_and_decode(size, filesystem), batch_format="numpy", batch_size=64).take_all()
    return _arrays(rows, size)


def _arrays(rows: list[dict[str, np.ndarray]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded rows, in label order, as (images, labels) arrays."""
    rows.sort(key=lambda r: int(r["label"]))
    images = np.stack([r["image"] for r in rows]) if rows else np.empty((0, 3, size, size), dtype=np.uint8)
    return images, np.asarray([r["label"] for r in rows], dtype=np.int64)


def _decode_shard_rows(size: int, filesystem: pafs.FileSystem | None):
    """One shard's sampled rows per call: read only their row groups, decode, resize and centre-crop."""
    from raydino.data.shards import read_rows

    transform = _eval_transform(size)

    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = ((f"{shard} row {r}", label, lambda d=data: d)
                   for shard, rows, labels in zip(batch["shard"], batch["rows"], batch["labels"])
                   for r, data, label in zip(rows, read_rows(str(shard), [int(r) for r in rows], filesystem), labels))
        return _resized_rows(entries, transform, size)

    return fn


def _shard_arrays(path: str, size: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The evaluation arrays of a labelled shard set: sample rows from the label columns, then read and decode
    only the row groups that hold them (one Ray task per shard)."""
    from raydino.data.shards import sample_shards

    picks, n_classes, filesystem = sample_shards(path, limit, seed)
    items = [{"shard": p, "rows": rows, "labels": labels} for p, rows, labels in picks]
    rows = ray.data.from_items(items).map_batches(_decode_shard_rows(size, filesystem), batch_format="numpy",
                                                  batch_size=1).take_all()
    return (*_arrays(rows, size), n_classes)


def _imagefolder_arrays(path: str, size: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The evaluation arrays of an ImageFolder (or a labelled shard set): sample the paths, then decode only those."""
    from raydino.stores.shard_manifest import is_shard_set

    if is_shard_set(path):
        return _shard_arrays(path, size, limit, seed)
    paths, labels, n_classes, filesystem = sample_imagefolder(path, limit, seed)
    images, labels_out = decode_files(paths, labels, size, filesystem)
    return images, labels_out, n_classes


def _split(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """A fixed stratified 80/20 split of one labelled folder into kNN bank and test set."""
    from sklearn.model_selection import train_test_split

    stratify = labels if np.bincount(labels).min() >= 2 else None
    return tuple(train_test_split(images, labels, test_size=0.2, random_state=seed, stratify=stratify))


def load_eval_data(cfg: Config, split_same_folder: bool = False) -> EvalData | None:
    """The evaluation split for the configured source; None when there is none to use.

    ``split_same_folder``: eval.train_path is one labelled folder to split 80/20.
    """
    limit, seed, size = cfg.eval.max_images, cfg.seed, cfg.data.crops.global_size
    if DATA_SOURCES[cfg.data.source].embedded:
        train, test = (load_embedded(cfg.data.source, split, size, seed) for split in ("train", "test"))
        train_x, train_y = _subsample(train.images, train.labels, limit, seed)
        test_x, test_y = _subsample(test.images, test.labels, limit, seed + 1)
        if train_x.shape[-1] != size:
            resize = v2.Resize(size, antialias=True)
            train_x = resize(torch.from_numpy(train_x)).numpy()
            test_x = resize(torch.from_numpy(test_x)).numpy()
        return EvalData(train_x, train_y, test_x, test_y, len(train.classes))
    if split_same_folder and cfg.eval.train_path:
        images, labels, n_classes = _imagefolder_arrays(cfg.eval.train_path, size, 2 * limit, seed)
        train_x, test_x, train_y, test_y = _split(images, labels, seed)
        return EvalData(train_x, train_y, test_x, test_y, n_classes)
    if cfg.eval.train_path and cfg.eval.test_path:
        train_x, train_y, n_classes = _imagefolder_arrays(cfg.eval.train_path, size, limit, seed)
        test_x, test_y, _ = _imagefolder_arrays(cfg.eval.test_path, size, limit, seed + 1)
        return EvalData(train_x, train_y, test_x, test_y, n_classes)
    return None


def has_eval_data(cfg: Config) -> bool:
    """Whether ``load_eval_data(cfg)`` finds labelled data: per-epoch kNN is possible."""
    has_paths = bool(cfg.eval.train_path and cfg.eval.test_path) or bool(standard_eval_paths(cfg))
    return DATA_SOURCES[cfg.data.source].embedded or has_paths
