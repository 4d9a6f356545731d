"""Held-out labelled images for evaluation, as in-memory arrays at the global crop size."""

from __future__ import annotations

import numpy as np
import ray.data
import torch
from torchvision.transforms import v2

from raydino.config import Config
from raydino.data.embedded import load_embedded
from raydino.data.sources import imagefolder_dataset
from raydino.eval.data import EvalData
from raydino.registry import DATA_SOURCES


def _subsample(images: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if len(labels) <= limit:
        return images, labels
    idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=limit, replace=False))
    return images[idx], labels[idx]


def _resize_center(size: int):
    transform = v2.Compose([v2.RGB(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [transform(torch.from_numpy(np.asarray(im).copy())).numpy() for im in batch["image"]]
        return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}

    return fn


def _imagefolder_arrays(path: str, size: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    source = imagefolder_dataset(path)
    ds: ray.data.Dataset = source.dataset.random_shuffle(seed=seed).limit(limit)
    rows = ds.map_batches(_resize_center(size), batch_format="numpy", batch_size=64).take_batch(limit)
    return rows["image"], rows["label"], len(source.classes)


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
    return DATA_SOURCES[cfg.data.source].embedded or bool(cfg.eval.train_path and cfg.eval.test_path)
