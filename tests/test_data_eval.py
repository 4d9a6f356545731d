import numpy as np
import pytest
import torch

from raydino.config import CropsConfig
from raydino.data.augment import MultiCrop, crop_names
from raydino.data.embedded import load_digits, load_fashion_mnist
from raydino.eval.data import EvalData
from raydino.eval.knn import knn_predict, knn_top1, raw_pixel_knn_top1


def test_multicrop_shapes_dtype_and_seed():
    crops = CropsConfig(global_size=32, local_size=16, local_number=3)
    mc = MultiCrop(crops)
    images = [torch.randint(0, 256, (1, 40, 36), dtype=torch.uint8) for _ in range(5)]
    a = dict(zip(crop_names(3), mc.crop_batch(images, seeds=[7] * 5)))
    assert list(a) == ["global_0", "global_1", "local_0", "local_1", "local_2"]
    assert a["global_0"].shape == (5, 3, 32, 32) and a["local_2"].shape == (5, 3, 16, 16)
    assert all(v.dtype == torch.uint8 for v in a.values())
    b, c = mc.crop_batch(images, seeds=[7] * 5), mc.crop_batch(images, seeds=[8] * 5)
    assert all(torch.equal(x, y) for x, y in zip(a.values(), b))
    assert not all(torch.equal(x, y) for x, y in zip(a.values(), c))


def test_digits_split_is_stratified_and_disjoint():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == np.uint8
    assert set(np.unique(test.labels)) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_knn_against_a_direct_computation():
    torch.manual_seed(0)
    train, labels, test = torch.randn(50, 8), torch.randint(0, 3, (50,)), torch.randn(7, 8)
    scores = knn_predict(train, labels, test, 3, k=5, temperature=0.1)
    tn, qn = train / train.norm(dim=1, keepdim=True), test / test.norm(dim=1, keepdim=True)
    for i in range(7):
        sims = qn[i] @ tn.T
        top = sims.argsort(descending=True)[:5]
        expected = torch.zeros(3)
        for j in top:
            expected[labels[j]] += torch.exp(sims[j] / 0.1)
        torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-5)


def test_knn_top1_on_separable_clusters():
    centers = torch.eye(4) * 10
    labels = torch.arange(4).repeat(10)
    feats = centers[labels] + torch.randn(40, 4)
    assert knn_top1(feats, labels, feats[:8] + 0.1, labels[:8], 4, k=5) == 100.0


def test_raw_pixel_knn_is_nearest_neighbour_on_flattened_pixels():
    """k = 1: the label of the training image with the highest cosine similarity of the raw pixels,
    checked against scikit-learn's 1-NN with the cosine metric; on the digits it is high (the baseline
    README quotes)."""
    from sklearn.neighbors import KNeighborsClassifier

    train, test = load_digits("train", size=16), load_digits("test", size=16)
    data = EvalData(train.images, train.labels, test.images, test.labels, 10)
    ours = raw_pixel_knn_top1(data, k=1)
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64)
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(flat(train.images), train.labels)
    assert ours == pytest.approx(100 * (sk.predict(flat(test.images)) == test.labels).mean(), abs=1e-4)  # float32 mean
    assert raw_pixel_knn_top1(data) > 90


def _write_idx(path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_the_idx_files_and_resamples_to_the_crop_size(tmp_path):
    """The Debian package's idx files (written here in the same format): 28 px as stored, or resampled
    to the global crop size, as the digits are, so evaluation sees the training crops' resolution."""
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, :, :14] = 255  # left half bright
    images[1] = 128
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4]))
    full = load_fashion_mnist("test", root=tmp_path)
    assert full.images.shape == (3, 1, 28, 28) and full.labels.tolist() == [3, 1, 4]
    np.testing.assert_array_equal(full.images[:, 0], images)
    small = load_fashion_mnist("test", root=tmp_path, size=16)
    assert small.images.shape == (3, 1, 16, 16) and small.images.dtype == np.uint8
    assert (small.images[0, 0, :, :7] == 255).all() and (small.images[0, 0, :, 9:] == 0).all()
    assert (small.images[1] == 128).all() and small.classes[3] == "Dress"
