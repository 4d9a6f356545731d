"""Real datasets that need no download: scikit-learn's digits, Debian's Fashion-MNIST.

Each source returns uint8 images (N, 1, H, W) and integer labels, split into a
pretraining/train part and a held-out evaluation part.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydino.config.registry import DATA_SOURCES, require_all

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_SIZE = 32


@dataclass(frozen=True)
class ArrayDataset:
    """In-memory labelled images: small embedded sets only."""

    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def load_digits(split: str = "train", size: int = DIGITS_SIZE, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 1,797 8x8 digits, upsampled to ``size`` px; a fixed stratified 75/25 split."""
    import torch  # here, not at module level: Ray Data read tasks import this module's package
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split
    from torch.nn import functional as F

    digits = sk_load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.25, random_state=seed, stratify=labels
    )
    idx = _split_index(split, idx_train, idx_test)
    return ArrayDataset(images[idx], labels[idx], tuple(str(i) for i in range(10)))


def _split_index(split: str, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    if split == "train":
        return train
    if split == "test":
        return test
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()  # writable for torch


FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR, size: int | None = None) -> ArrayDataset:
    """Fashion-MNIST's official 60k/10k split from the Debian package's idx files; 28 px, or resampled to
    ``size`` px (antialiased) so that evaluation sees the training crops' resolution."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images_path, labels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found; install it with `apt-get install dataset-fashion-mnist` "
                "or use data.source=digits"
            )
    images = _read_idx(images_path)[:, None]
    labels = _read_idx(labels_path).astype(np.int64)
    if size is not None and size != images.shape[-1]:
        import torch
        from torch.nn import functional as F

        resized = F.interpolate(torch.from_numpy(images).float(), size=(size, size), mode="bilinear",
                                antialias=True, align_corners=False)
        images = resized.clamp(0, 255).round().to(torch.uint8).numpy()
    return ArrayDataset(np.ascontiguousarray(images), labels, FASHION_CLASSES)


# source name (raydino.config.registry.DATA_SOURCES, embedded ones) -> loader(split, size, seed)
_LOADERS: dict[str, Callable[[str, int, int], ArrayDataset]] = {
    "digits": lambda split, size, seed: load_digits(split, size=size, seed=seed),
    "fashion_mnist": lambda split, size, _seed: load_fashion_mnist(split, size=size),
}
require_all({k: v for k, v in DATA_SOURCES.items() if v.embedded}, _LOADERS, "embedded data sources")


def load_embedded(source: str, split: str, size: int, seed: int = 0) -> ArrayDataset:
    """The ``split`` of an embedded source; ``size`` is the global crop size (digits are resampled to it)."""
    if source not in _LOADERS:
        raise ValueError(f"data.source={source!r} is not embedded; embedded sources: {', '.join(_LOADERS)}")
    return _LOADERS[source](split, size, seed)


def embedded_location(source: str) -> str:
    """Where an embedded source's files are (what an MLflow dataset input names as its source): the
    digits file shipped with scikit-learn, or the Fashion-MNIST package's directory."""
    if source == "digits":
        from importlib.util import find_spec

        spec = find_spec("sklearn")  # found, not imported
        if spec is not None and spec.submodule_search_locations:
            return str(Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz")
        return "sklearn.datasets.load_digits"
    if source == "fashion_mnist":
        return str(FASHION_MNIST_DIR)
    raise ValueError(f"data.source={source!r} is not embedded; embedded sources: {', '.join(_LOADERS)}")
