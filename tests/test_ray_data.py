"""Ray Data sources and the multi-crop stage, on a 2-CPU local Ray started once per session."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.data
from PIL import Image

from raydino.config import CropsConfig
from raydino.data.augment import crop_names
from raydino.data.clock import EpochClock
from raydino.data.embedded import ArrayDataset
from raydino.data.pipeline import EarlyStart, MultiCropStage, epoch_stream, multicrop_dataset
from raydino.data.sources import array_dataset, image_directory_dataset, imagefolder_dataset

CROPS = CropsConfig(global_size=16, local_size=8, local_number=2, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4))


def _save(path: Path, shape: tuple[int, ...], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


@pytest.fixture
def imagefolder(tmp_path: Path) -> tuple[Path, set[tuple[tuple[int, ...], int]]]:
    """Classes ant/bee/cat; ant holds only a corrupt .jpg, so a bad file must not shift bee=1, cat=2.

    Every good image has a unique size, so (shape, label) pairs identify them.
    """
    root = tmp_path / "folder"
    (root / "ant").mkdir(parents=True)
    (root / "ant" / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    _save(root / "bee" / "b0.png", (10, 12, 3), 10)  # RGB PNG
    _save(root / "bee" / "b1.jpg", (11, 12, 3), 20)  # RGB JPEG
    _save(root / "cat" / "c0.png", (12, 12), 30)  # grayscale PNG -> 1 channel
    _save(root / "cat" / "sub" / "c1.JPEG", (13, 12), 40)  # nested, upper-case extension, grayscale JPEG
    (root / "cat" / "notes.txt").write_text("not an image: ignored, not counted as skipped")
    _save(root / "stray.png", (5, 5, 3), 0)  # not in a class directory: ignored
    expected = {((3, 10, 12), 1), ((3, 11, 12), 1), ((1, 12, 12), 2), ((1, 13, 12), 2)}
    return root, expected


@pytest.mark.timeout(60)
def test_imagefolder_labels_and_skipped_corrupt_file(ray_session: None, imagefolder) -> None:
    root, expected = imagefolder
    source = imagefolder_dataset(root)
    assert source.classes == ("ant", "bee", "cat")
    rows = source.dataset.take_all()
    assert {(row["image"].shape, int(row["label"])) for row in rows} == expected
    assert len(rows) == len(expected)
    assert all(row["image"].dtype == np.uint8 for row in rows)
    assert len({int(row["key"]) for row in rows}) == len(rows)
    assert source.skipped.count() == 1
    assert source.skipped.paths() == [str((root / "ant" / "corrupt.jpg").resolve())]
    source.dataset.take_all()  # a second epoch re-reads the file but does not count it twice
    assert source.skipped.count() == 1


@pytest.mark.timeout(60)
def test_image_directory_is_recursive_unlabelled_and_skips_truncated(ray_session: None, tmp_path: Path) -> None:
    _save(tmp_path / "a.png", (9, 9, 3), 50)
    _save(tmp_path / "deep" / "er" / "b.jpg", (10, 9, 3), 60)
    _save(tmp_path / "t.jpg", (64, 64, 3), 70)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG: opens, fails to decode
    source = image_directory_dataset(tmp_path)
    rows = source.dataset.take_all()
    assert sorted(row["image"].shape for row in rows) == [(3, 9, 9), (3, 10, 9)]
    assert {int(row["label"]) for row in rows} == {-1}
    assert source.skipped.count() == 1


@pytest.mark.timeout(30)
def test_missing_and_empty_paths_fail_at_once_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for build in (imagefolder_dataset, image_directory_dataset):
        with pytest.raises(FileNotFoundError, match="nope.*does not exist; expected"):
            build(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*no class subdirectories.*<class_name>"):
        imagefolder_dataset(empty)
    with pytest.raises(FileNotFoundError, match=r"empty.*no image files"):
        image_directory_dataset(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"empty.*no image files.*class directories"):
        imagefolder_dataset(empty)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"file\.png.*not a directory"):
        imagefolder_dataset(a_file)


def _arrays(n: int = 24) -> ArrayDataset:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 1, 20, 20), dtype=np.uint8)  # grayscale, like digits / fashion-mnist
    return ArrayDataset(images, np.arange(n, dtype=np.int64) % 3, ("a", "b", "c"))


def _batch_digests(batch: dict[str, np.ndarray]) -> list[tuple[int, str]]:
    out = []
    for i in range(len(batch["label"])):
        h = hashlib.sha1()
        for name in crop_names(CROPS.local_number):
            h.update(batch[name][i].tobytes())
        out.append((int(batch["label"][i]), h.hexdigest()))
    return out


def _crop_digests(batches: Iterable[dict[str, np.ndarray]]) -> list[tuple[int, str]]:
    """(label, digest of all crops) per row of the batches, sorted: compares runs whatever the row order."""
    return sorted(d for batch in batches for d in _batch_digests(batch))


def _numpy_batches(ds: ray.data.Dataset) -> list[dict[str, np.ndarray]]:
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def _in_process_digests(data: ArrayDataset, seed: int) -> list[tuple[int, str]]:
    """What the crop stage gives every row of ``data`` (key = row index) called in this process, in one batch."""
    batch = {"image": data.images, "label": data.labels, "key": np.arange(len(data), dtype=np.int64)}
    return sorted(_batch_digests(MultiCropStage(CROPS, seed=seed)(batch)))


@pytest.mark.timeout(60)
def test_multicrop_crops_follow_the_row_key_not_order_or_batches(ray_session: None) -> None:
    """Shuffled and batched unlike the stage called on all rows at once in this process, the crops are the same:
    they follow the row key, not order or batch composition (and the stage's own test shows it depends on seed).
    Every batch holds the crop columns (grayscale rows cropped to 3 channels, uint8), int64 labels and the epoch;
    varied sizes and channels in one batch: tests/test_batched_crops.py, and an image folder end to end in
    tests/test_pretrain_e2e.py."""
    data = _arrays()
    shuffled = array_dataset(data, rows_per_block=7).dataset.random_shuffle(seed=5)
    batches = _numpy_batches(multicrop_dataset(shuffled, CROPS, seed=3, num_actors=1, batch_size=5))
    names = crop_names(CROPS.local_number)
    for batch in batches:
        assert set(batch) == set(names) | {"label", "epoch"}
        n = len(batch["label"])
        assert batch["epoch"].tolist() == [0] * n and batch["label"].dtype == np.int64
        for name in names:
            size = CROPS.global_size if name.startswith("global") else CROPS.local_size
            assert batch[name].shape == (n, 3, size, size) and batch[name].dtype == np.uint8
    crops = _crop_digests(batches)
    assert len(crops) == len(data)
    assert crops == _in_process_digests(data, seed=3)


@pytest.mark.timeout(30)
def test_multicrop_stage_seeds_per_row_from_seed_epoch_and_key() -> None:
    """The actor's callable, in process: seed and epoch change the crops, batching and order do not."""
    data = _arrays(6)
    batch = {"image": data.images, "label": data.labels, "key": np.arange(6, dtype=np.int64)}
    out = MultiCropStage(CROPS, seed=3)(batch)
    perm = np.array([4, 1, 5, 0, 2, 3])
    permuted = MultiCropStage(CROPS, seed=3)({k: v[perm] for k, v in batch.items()})
    halves = [MultiCropStage(CROPS, seed=3)({k: v[s] for k, v in batch.items()}) for s in (slice(0, 2), slice(2, 6))]
    other_seed = MultiCropStage(CROPS, seed=4)(batch)
    other_epoch = MultiCropStage(CROPS, seed=3, epoch=1)(batch)
    for name in crop_names(CROPS.local_number):
        np.testing.assert_array_equal(permuted[name], out[name][perm])
        np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), out[name])
        assert not np.array_equal(other_seed[name], out[name])
        assert not np.array_equal(other_epoch[name], out[name])
    np.testing.assert_array_equal(out["label"], data.labels)
    empty = MultiCropStage(CROPS, seed=3)({k: v[:0] for k, v in batch.items()})
    assert empty["global_0"].shape == (0, 3, CROPS.global_size, CROPS.global_size)


@pytest.mark.timeout(90)
def test_epoch_stream_every_pass_holds_every_row_once_with_its_own_crops(ray_session: None) -> None:
    """All epochs in one stream, started as a resumed run starts it (the clock at its epoch, here 1): pass e is
    epoch 1 + e, with the crops the stage gives for that epoch, each row once. (A stream without a clock starts
    at epoch 0: the same sum with base 0, as every other crop test here runs.)"""
    data = _arrays(12)
    source = array_dataset(data, rows_per_block=4)
    clock = EpochClock.remote(1)
    try:
        stream = multicrop_dataset(epoch_stream(source.dataset, 3, block_order_seed=0), CROPS, seed=3, num_actors=1,
                                   batch_size=4, epoch_clock=clock)
        rows = stream.take_all()
    finally:
        ray.kill(clock)
    assert len(rows) == 3 * len(data)
    assert sorted({int(row["epoch"]) for row in rows}) == [1, 2, 3]
    batch = {"image": data.images, "label": data.labels, "key": np.arange(len(data), dtype=np.int64)}
    for epoch in (1, 2, 3):
        in_pass = [row for row in rows if int(row["epoch"]) == epoch]
        assert len(in_pass) == len(data)
        expected = MultiCropStage(CROPS, seed=3, epoch=epoch)(batch)
        digest = {hashlib.sha1(expected["global_0"][i].tobytes()).hexdigest(): int(data.labels[i]) for i in range(len(data))}
        assert {hashlib.sha1(row["global_0"].tobytes()).hexdigest(): int(row["label"]) for row in in_pass} == digest


def test_epoch_stream_rejects_zero_epochs(ray_session: None) -> None:
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        epoch_stream(ray.data.range(1), 0)


@pytest.mark.timeout(90)
def test_an_autoscaling_crop_pool_stays_in_its_bounds_and_is_metered(ray_session: None) -> None:
    """Ray Data's autoscaling actor pool (min 1, max 3) crops every row once, with the crops one stage gives
    them all in this process; the meter says how many actors worked and how fast."""
    from raydino.data.clock import start_crop_meter

    data = _arrays(48)
    source = array_dataset(data, rows_per_block=4)
    meter = start_crop_meter()
    try:
        pooled = _crop_digests(_numpy_batches(
            multicrop_dataset(source.dataset, CROPS, seed=3, num_actors=(1, 3), batch_size=4, cpus_per_actor=0.5,
                              meter=meter)
        ))
        stats = ray.get(meter.summary.remote(), timeout=30)
    finally:
        ray.kill(meter)
    assert pooled == _in_process_digests(data, seed=3)
    assert 1 <= stats["crop_actors_used"] <= 3
    assert stats["cropped_images"] == len(data) and stats["crop_images_per_second_per_actor"] > 0
    with pytest.raises(ValueError, match="1 <= min <= max"):
        multicrop_dataset(source.dataset, CROPS, seed=3, num_actors=(3, 1), batch_size=4)


def test_early_start_asks_for_the_first_item_at_once_and_then_yields_in_order():
    """A training worker's stream starts its crop actors while the model is built (raydino.train.loop)."""
    import threading

    asked = threading.Event()
    release = threading.Event()

    def items():
        asked.set()
        assert release.wait(30), "never released"
        yield from (1, 2, 3)

    stream = EarlyStart(items())
    assert asked.wait(30), "the first item was not asked for before next()"
    release.set()
    assert list(stream) == [1, 2, 3]


def test_early_start_ends_and_fails_like_the_iterator_it_wraps():
    assert next(EarlyStart(iter([])), None) is None

    def broken():
        raise OSError("the bucket is unreachable")
        yield  # a generator

    stream = EarlyStart(broken())
    with pytest.raises(OSError, match="the bucket is unreachable"):  # raised in the caller's thread, at its next
        next(stream)
