"""Image sources as Ray Datasets: ImageFolder, a plain image directory, the embedded arrays.

Every source yields rows ``{"image", "label", "key"}``:

- ``image``: uint8, **CHW** (channels first, 1 or 3 channels; grayscale stays 1-channel,
  every other mode becomes RGB). File sources have one shape per file (a variable-shaped
  tensor column); the multi-crop stage turns them into fixed-shape crops.
- ``label``: int64, the index of the class in ``classes``; -1 when unknown.
- ``key``: int64, a stable id of the row (array index, or a hash of the file's path
  relative to the root) that the multi-crop stage seeds from, so crops do not depend on
  block order, batching, shuffling or which actor does the work.

Files are read as raw bytes with ``ray.data.read_binary_files`` and decoded by us, not by
``ray.data.read_images``: in Ray 2.60 one corrupt file makes ``read_images`` raise and fail
the whole dataset (``DataContext.max_errored_blocks`` would instead drop the whole block,
good images with it). Undecodable files are dropped one by one, logged, and their paths
sent to a small counter actor: ``ImageSource.skipped.count()`` after consumption.

Paths are local (visible from every node that runs Ray Data tasks: one machine, or shared
storage on a cluster) or URIs of any pyarrow filesystem (``s3://``, ``gs://`` ...), listed on the
driver and read by the tasks through the filesystem resolved there (``data/locations.py``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data

from raydino.data.embedded import ArrayDataset
from raydino.stores.locations import IMAGE_EXTENSIONS, DataLocation, locate

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = -1
_DECODE_BATCH = 64  # images decoded per task call: bounds the memory of one output block
_ROWS_PER_BLOCK = 64  # rows per block for in-memory arrays: small blocks stream through the crop actors


@ray.remote(num_cpus=0, max_restarts=0)
class _SkipLog:
    """Paths of undecodable files, shared by all decode tasks; a set, so retries and epochs never double count."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}

    def add(self, failures: list[tuple[str, str]]) -> None:
        for path, reason in failures:
            self._paths.setdefault(path, reason)

    def get(self) -> dict[str, str]:
        return dict(self._paths)


@dataclass(frozen=True)
class SkippedImages:
    """Driver-side handle on the files a source dropped as undecodable (no actor for in-memory sources)."""

    actor: Any = None
    known: dict[str, str] = field(default_factory=dict)
    """Skipped before the run (a shard set's files that did not decode when it was written)."""

    def reasons(self) -> dict[str, str]:
        """path -> error message, for every file skipped so far (in any epoch, on any node)."""
        return {**self.known, **({} if self.actor is None else ray.get(self.actor.get.remote()))}

    def paths(self) -> list[str]:
        return sorted(self.reasons())

    def count(self) -> int:
        return len(self.reasons())


@dataclass(frozen=True)
class ImageSource:
    """A dataset with its class names and its skipped-file log; the dataset alone cannot carry them."""

    dataset: ray.data.Dataset
    classes: tuple[str, ...] = ()
    skipped: SkippedImages = field(default_factory=SkippedImages)
    num_files: int = 0
    """Rows expected before decoding (files listed, or array rows); undecodable files come off this."""
    in_memory: bool = False
    """Blocks already exist (embedded arrays): reordering them per epoch costs nothing."""
    pass_dataset: Callable[[int], ray.data.Dataset] | None = None
    """Pass ``e`` of the data in its own seeded order (shard sets); None: every pass reads ``dataset``."""


def _missing(location: DataLocation, expected: str) -> FileNotFoundError:
    return FileNotFoundError(f"data path {location.uri!r} {expected}")


def _check_dir(path: str | os.PathLike[str], expected: str) -> DataLocation:
    location = locate(path)
    kind = location.kind()
    if kind == "missing":
        raise _missing(location, f"does not exist; expected {expected}")
    if kind != "dir":
        raise _missing(location, f"is not a directory; expected {expected}")
    return location


def _stable_key(relative_path: str) -> int:
    """Signed 64-bit hash of a path: the same on every node and every run (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(relative_path.encode(), digest_size=8).digest(), "little", signed=True)


def stratified_sample(counts: list[int], limit: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices to keep per class: ``limit`` in all (or everything), each class in proportion to its size
    (largest remainders get the rounding), drawn without replacement."""
    total = sum(counts)
    if total <= limit:
        return [np.arange(n) for n in counts]
    exact = np.asarray(counts, dtype=np.float64) * limit / total
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: limit - int(quota.sum())]:
        quota[i] += 1
    return [np.sort(rng.choice(n, size=q, replace=False)) for n, q in zip(counts, quota)]


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 CHW array (1 channel for grayscale, else 3); raises on any undecodable file."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode fully now, so a truncated file fails here rather than later
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if img.mode in ("1", "I;16", "I", "F") else "RGB")
        array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        return array[None].copy()
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def image_column(images: list[np.ndarray]) -> np.ndarray:
    """Stack equal shapes; otherwise a ragged object array, which Ray stores as a variable-shaped tensor column."""
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    column = np.empty(len(images), dtype=object)
    for i, im in enumerate(images):
        column[i] = im
    return column


def decode_rows(entries: Iterable[tuple[bytes, str, int, int]], skip_log: Any) -> dict[str, np.ndarray]:
    """Rows ``{image, label, key}`` from ``(encoded bytes, path, label, key)``: files and shard rows alike. One
    that fails to decode is dropped, logged and recorded in ``skip_log`` (waited for, so the count is complete
    once the rows are consumed)."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[int] = []
    failures: list[tuple[str, str]] = []
    for data, path, label, key in entries:
        try:
            image = decode_image(data)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types: UnidentifiedImageError, OSError, ...
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("raydino: skipping undecodable image %s (%s)", path, reason)
            failures.append((path, reason))
            continue
        images.append(image)
        labels.append(label)
        keys.append(key)
    if failures:
        ray.get(skip_log.add.remote(failures))
    if not images:
        return {
            "image": np.empty((0, 1, 1, 1), dtype=np.uint8),
            "label": np.empty(0, dtype=np.int64),
            "key": np.empty(0, dtype=np.int64),
        }
    return {
        "image": image_column(images),
        "label": np.asarray(labels, dtype=np.int64),
        "key": np.asarray(keys, dtype=np.int64),
    }


def _decode_batch(
    batch: dict[str, np.ndarray], *, root: str, class_to_idx: dict[str, int] | None, skip_log: Any
) -> dict[str, np.ndarray]:
    """Decode a batch of files, dropping (and reporting) the ones that fail."""
    prefix = root.rstrip("/") + "/"

    def entries() -> Iterator[tuple[bytes, str, int, int]]:
        for data, path in zip(batch["bytes"], batch["path"]):
            relative = str(path).removeprefix(prefix)
            label = UNKNOWN_LABEL if class_to_idx is None else class_to_idx[relative.split("/", 1)[0]]
            yield data, str(path), label, _stable_key(relative)

    return decode_rows(entries(), skip_log)


def _files_dataset(
    paths: list[str], root: DataLocation, class_to_idx: dict[str, int] | None
) -> tuple[ray.data.Dataset, SkippedImages]:
    """``paths``: directories (listed again by Ray, in pages) or, for a sample, the files themselves."""
    skip_log = _SkipLog.remote()
    # shuffle="files": a new file order every epoch, so sorted class directories still mix
    raw = ray.data.read_binary_files(
        paths, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS),
        shuffle="files", filesystem=root.filesystem,
    )
    ds = raw.map_batches(
        _decode_batch,
        batch_size=_DECODE_BATCH,
        batch_format="numpy",
        fn_kwargs={"root": root.path, "class_to_idx": class_to_idx, "skip_log": skip_log},
    )
    return ds, SkippedImages(skip_log)


_IMAGEFOLDER = "an ImageFolder directory: <path>/<class_name>/<image files>"


def _imagefolder_classes(path: str | os.PathLike[str]) -> tuple[DataLocation, tuple[str, ...]]:
    """The root and class names of an ImageFolder; FileNotFoundError for a missing folder or no classes."""
    root = _check_dir(path, _IMAGEFOLDER)
    classes = tuple(root.subdirectories())
    if not classes:
        raise _missing(root, f"has no class subdirectories; expected {_IMAGEFOLDER}")
    return root, classes


def _no_images(root: DataLocation) -> FileNotFoundError:
    return _missing(root, f"has no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class directories; "
                          f"expected {_IMAGEFOLDER}")


def list_imagefolder(path: str | os.PathLike[str]) -> tuple[DataLocation, dict[str, list[str]]]:
    """The root and class name -> sorted image paths (inside the root's filesystem) of an ImageFolder,
    from the listing alone; FileNotFoundError as ``imagefolder_dataset`` raises it for a missing folder,
    no classes or no images."""
    root, classes = _imagefolder_classes(path)
    files = {c: list(root.child(c).image_files()) for c in classes}
    if not any(files.values()):
        raise _no_images(root)
    return root, files


def sample_listing(groups: list[list[str]], limit: int, seed: int) -> list[tuple[int, str]]:
    """(group index, path) for a seeded sample of at most ``limit`` listed paths, each group (class) in
    proportion to its size (``stratified_sample``); group by group, in listing order."""
    keep = stratified_sample([len(g) for g in groups], limit, np.random.default_rng(seed))
    return [(label, group[i]) for label, (group, idx) in enumerate(zip(groups, keep)) for i in idx]


def imagefolder_dataset(path: str | os.PathLike[str], max_files: int | None = None, seed: int = 0) -> ImageSource:
    """ImageFolder layout ``path/<class>/**/<image>``; label = index of the class in the sorted class names.

    Streams: files are listed on the driver, read and decoded in Ray tasks. Files directly
    under ``path`` and files without an image extension are ignored. Raises FileNotFoundError
    at once when the path is missing, has no class directories, or has no image files.
    ``max_files``: a seeded, class-stratified sample of the listing instead of every file.
    """
    root, classes = _imagefolder_classes(path)
    directories = [root.child(c) for c in classes]
    class_to_idx = {name: i for i, name in enumerate(classes)}
    if max_files is not None:
        files = [path for _, path in sample_listing([list(d.image_files()) for d in directories], max_files, seed)]
        if not files:
            raise _no_images(root)
        ds, skipped = _files_dataset(files, root, class_to_idx)
        return ImageSource(ds, classes, skipped, len(files))
    num_files = sum(1 for d in directories for _ in d.image_files())  # counted, not kept: ImageNet has 1.28 M
    if num_files == 0:
        raise _no_images(root)
    ds, skipped = _files_dataset([d.path for d in directories], root, class_to_idx)
    return ImageSource(ds, classes, skipped, num_files)


def image_directory_dataset(path: str | os.PathLike[str], max_files: int | None = None, seed: int = 0) -> ImageSource:
    """Every image file under ``path`` (recursively), unlabelled (label -1): for pretraining on raw images;
    ``max_files``: a seeded sample of them instead."""
    expected = "a directory holding image files (searched recursively)"
    root = _check_dir(path, expected)
    if max_files is not None:
        files = [path for _, path in sample_listing([list(root.image_files())], max_files, seed)]
        num_files, paths = len(files), files
    else:
        num_files, paths = sum(1 for _ in root.image_files()), [root.path]
    if num_files == 0:
        raise _missing(root, f"has no image files ({', '.join(IMAGE_EXTENSIONS)}); expected {expected}")
    ds, skipped = _files_dataset(paths, root, None)
    return ImageSource(ds, (), skipped, num_files)


def array_dataset(data: ArrayDataset, rows_per_block: int = _ROWS_PER_BLOCK) -> ImageSource:
    """An embedded in-memory set as a Dataset of fixed-shape tensor blocks; key = the row's index."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    images = np.ascontiguousarray(data.images, dtype=np.uint8)
    labels = np.asarray(data.labels, dtype=np.int64)
    if images.ndim != 4 or len(images) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"array_dataset needs images (N, C, H, W) and N labels with N > 0, got {images.shape} and {labels.shape}"
        )
    tables = [
        pa.table(
            {
                "image": ArrowTensorArray.from_numpy(images[start : start + rows_per_block]),
                "label": labels[start : start + rows_per_block],
                "key": np.arange(start, min(start + rows_per_block, len(labels)), dtype=np.int64),
            }
        )
        for start in range(0, len(labels), rows_per_block)
    ]
    # from_blocks: the blocks' metadata is read here; from_arrow would start a task (and on a fresh Ray a worker
    # process, ~1 s of CPU each) per block to read it
    return ImageSource(ray.data.from_blocks(tables), tuple(data.classes), num_files=len(labels), in_memory=True)
