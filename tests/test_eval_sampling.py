"""Evaluation data from an ImageFolder: a seeded, class-stratified sample of paths, and only those
files read and decoded; loaded once per run (the end-to-end count is in test_pretrain_e2e)."""

import numpy as np
import pytest
from PIL import Image

from raydino.data.eval_data import _imagefolder_arrays, sample_imagefolder
from raydino.data.sources import stratified_sample


def test_stratified_sample_keeps_class_proportions_and_the_limit():
    counts = [300, 100, 600, 7]
    keep = stratified_sample(counts, 100, np.random.default_rng(0))
    sizes = [len(k) for k in keep]
    assert sum(sizes) == 100 and sizes == [30, 10, 59, 1]  # largest remainders take the rounding
    assert all(len(set(k)) == len(k) and (k < n).all() for k, n in zip(keep, counts))
    again = stratified_sample(counts, 100, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(keep, again))  # seeded
    other = stratified_sample(counts, 100, np.random.default_rng(1))
    assert not all(np.array_equal(a, b) for a, b in zip(keep, other))
    assert [len(k) for k in stratified_sample([3, 4], 100, np.random.default_rng(0))] == [3, 4]  # all, under the limit


@pytest.fixture
def folder(tmp_path):
    for name, n in (("ants", 30), ("bees", 10), ("cats", 60)):
        (tmp_path / name).mkdir()
        for i in range(n):
            pixels = np.full((12, 14, 3), (i * 7) % 256, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i:03d}.png")
    return tmp_path


def test_sampling_reads_no_file(folder):
    for image in folder.rglob("*.png"):  # every file unreadable as an image: the sample is made from names alone
        image.write_bytes(b"not an image")
    paths, labels, n_classes, filesystem = sample_imagefolder(str(folder), 20, seed=3)
    assert filesystem is None  # a local folder is read with open()
    assert n_classes == 3 and np.bincount(labels).tolist() == [6, 2, 12]
    assert paths == sample_imagefolder(str(folder), 20, seed=3)[0]
    assert all(p.split("/")[-2] == ["ants", "bees", "cats"][lab] for p, lab in zip(paths, labels))


@pytest.mark.timeout(120)
def test_only_the_sampled_files_are_decoded(ray_session, folder):
    paths, _, _, _ = sample_imagefolder(str(folder), 20, seed=3)
    sampled = set(paths)
    for image in folder.rglob("*.png"):  # every other file is corrupt: decoding one would drop it with a warning
        if str(image) not in sampled:
            image.write_bytes(b"not an image")
    images, labels, n_classes = _imagefolder_arrays(str(folder), 8, 20, seed=3)
    assert images.shape == (20, 3, 8, 8) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6, 2, 12] and n_classes == 3
    # a sampled file that turns out corrupt is dropped, the rest still come back
    (folder / paths[0].split("/")[-2] / paths[0].split("/")[-1]).write_bytes(b"broken")
    images, labels, _ = _imagefolder_arrays(str(folder), 8, 20, seed=3)
    assert len(images) == len(labels) == 19


@pytest.mark.timeout(120)
def test_data_max_files_trains_on_a_stratified_sample_and_reads_only_it(ray_session, folder):
    from raydino.data.sources import image_directory_dataset, imagefolder_dataset

    kept, _, _, _ = sample_imagefolder(str(folder), 20, seed=5)  # the same draw as the training subset
    for image in folder.rglob("*.png"):  # a file outside the sample would be skipped (and counted) if read
        if str(image) not in set(kept):
            image.write_bytes(b"not an image")
    source = imagefolder_dataset(str(folder), max_files=20, seed=5)
    assert source.num_files == 20 and source.classes == ("ants", "bees", "cats")
    rows = source.dataset.take_all()
    assert np.bincount([r["label"] for r in rows]).tolist() == [6, 2, 12]
    assert source.skipped.count() == 0
    assert imagefolder_dataset(str(folder), max_files=500).num_files == 100  # a limit above the count keeps all
    assert image_directory_dataset(str(folder), max_files=7, seed=5).num_files == 7
