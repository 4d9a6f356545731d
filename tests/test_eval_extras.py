import math

import numpy as np
import pytest
import torch

from raydino.eval.plots import plot_kappa_histogram, plot_loss_curve, plot_prototype_usage
from raydino.eval.probe import linear_probe_top1
from raydino.eval.prototypes import kappa_statistics, prototype_utilisation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _means(dim: int, num_classes: int, rng: np.random.Generator, scale: float = 6.0) -> np.ndarray:
    """Cluster centres in different directions (L2 normalisation would erase pure scale differences)."""
    means = rng.normal(size=(num_classes, dim))
    return scale * means / np.linalg.norm(means, axis=1, keepdims=True)


def _clusters(means: np.ndarray, n_per_class: int, rng: np.random.Generator):
    labels = np.repeat(np.arange(len(means)), n_per_class)
    return means[labels] + rng.normal(size=(len(labels), means.shape[1])), labels


def test_linear_probe_separates_clusters():
    rng = np.random.default_rng(0)
    means = _means(16, 4, rng)
    x_train, y_train = _clusters(means, 100, rng)
    x_test, y_test = _clusters(means, 50, rng)
    # torch tensors and numpy arrays are both accepted
    acc = linear_probe_top1(torch.from_numpy(x_train).float(), torch.from_numpy(y_train), x_test, y_test)
    assert acc >= 99.0


def test_linear_probe_random_labels_is_chance():
    rng = np.random.default_rng(1)
    x_train, x_test = rng.normal(size=(600, 16)), rng.normal(size=(800, 16))
    y_train, y_test = rng.integers(0, 4, 600), rng.integers(0, 4, 800)
    acc = linear_probe_top1(x_train, y_train, x_test, y_test)
    assert 17.0 <= acc <= 33.0  # chance 25%, std ~1.5%


def test_linear_probe_is_invariant_to_per_sample_scale():
    rng = np.random.default_rng(2)
    means = _means(8, 3, rng, scale=1.5)
    x_train, y_train = _clusters(means, 40, rng)
    x_test, y_test = _clusters(means, 40, rng)
    a = linear_probe_top1(x_train, y_train, x_test, y_test)
    b = linear_probe_top1(x_train * rng.uniform(0.1, 10, (len(x_train), 1)), y_train,
                          x_test * rng.uniform(0.1, 10, (len(x_test), 1)), y_test)
    assert a == pytest.approx(b, abs=1e-9)


def test_linear_probe_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_probe_top1(np.ones((5, 3)), np.zeros(4), np.ones((2, 3)), np.zeros(2))


def test_prototype_utilisation_on_hand_made_scores():
    # K = 5; argmaxes: 0, 0, 0, 2, 2, 4 -> 3 distinct, histogram [3, 0, 2, 0, 1] / 6
    scores = torch.tensor([
        [9.0, 1, 1, 1, 1],
        [5.0, 4, 1, 1, 1],
        [2.0, 1, 1, 1, 1],
        [0.0, 1, 7, 1, 1],
        [0.0, 1, 3, 1, -1],
        [0.0, 1, 1, 1, 8],
    ])
    out = prototype_utilisation(scores)
    assert out["distinct"] == 3 and out["num_prototypes"] == 5
    expected = torch.tensor([3, 0, 2, 0, 1], dtype=torch.float64) / 6
    torch.testing.assert_close(out["usage"], expected)
    direct = -sum(p * math.log(p) for p in (3 / 6, 2 / 6, 1 / 6))
    assert out["entropy"] == pytest.approx(direct, rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(direct), rel=1e-12)
    # logits (scores / tau) and softmax probabilities give the same answer
    again = prototype_utilisation((scores / 0.1).softmax(dim=1))
    assert again["distinct"] == 3 and again["entropy"] == pytest.approx(direct)


def test_prototype_utilisation_extremes():
    collapsed = torch.zeros(10, 7)
    collapsed[:, 3] = 1.0
    out = prototype_utilisation(collapsed)
    assert out["distinct"] == 1 and out["entropy"] == 0.0
    uniform = torch.eye(7).repeat(3, 1)
    out = prototype_utilisation(uniform)
    assert out["distinct"] == 7 and out["entropy"] == pytest.approx(math.log(7))
    with pytest.raises(ValueError):
        prototype_utilisation(torch.zeros(0, 4))


def test_kappa_statistics_match_numpy():
    norms = torch.rand(1001) * 3 + 0.1
    tau = 0.1
    stats = kappa_statistics(norms, tau)
    kappa = norms.double().numpy() / tau
    for q in (5, 25, 50, 75, 95):
        assert stats[f"q{q:02d}"] == pytest.approx(np.quantile(kappa, q / 100), rel=1e-9)
    assert stats["mean"] == pytest.approx(kappa.mean(), rel=1e-9)
    assert stats["min"] == pytest.approx(kappa.min(), rel=1e-9)
    assert stats["max"] == pytest.approx(kappa.max(), rel=1e-9)
    assert set(stats) == {"q05", "q25", "q50", "q75", "q95", "mean", "min", "max"}
    with pytest.raises(ValueError, match="temperature"):
        kappa_statistics(norms, 0.0)


def test_kappa_statistics_from_head():
    from raydino.models.head import DINOHead

    head = DINOHead(in_dim=8, num_prototypes=32, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    stats = kappa_statistics(head.prototype_norms(), 0.04)
    assert stats["min"] == pytest.approx(25.0) and stats["max"] == pytest.approx(25.0)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    p = plot_kappa_histogram({"student": rng.gamma(2, 10, 200), "teacher": np.full(200, 25.0)},
                             tmp_path / "sub" / "kappa.png")
    assert p == tmp_path / "sub" / "kappa.png"
    _assert_png(p)
    usage = np.zeros(64)
    usage[:10] = rng.dirichlet(np.ones(10))
    _assert_png(plot_prototype_usage(usage, tmp_path / "usage.png"))
    steps = np.arange(100)
    _assert_png(plot_loss_curve(steps, 5 * np.exp(-steps / 30) + 1, str(tmp_path / "loss.png")))


def test_prototype_usage_of_a_vmf_run_is_the_argmax_of_its_vmf_logits():
    """Unequal prototype norms: DINO-vMF's targets favour argmax_k w_k.y / tau + log C_p(||w_k|| / tau),
    computed here independently with scipy's exponentially scaled Bessel function."""
    from scipy.special import ive

    from raydino.config import load_config
    from raydino.eval.data import EvalData
    from raydino.eval.evaluate import evaluate_with_usage, extract
    from raydino.step import build_models
    from tests.tiny import TINY_NET

    cfg = load_config(overrides=[*TINY_NET, "loss.vmf=true", "head.norm_last_layer=false"])
    _, teacher = build_models(cfg)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        teacher.head.prototype_gain.copy_(torch.from_numpy(rng.uniform(0.2, 3.0, (cfg.head.num_prototypes, 1))))
    size = cfg.data.crops.global_size
    images = rng.uniform(0, 1, (60, 3, size, size)).astype(np.float32)
    labels = np.arange(60) % 3
    data = EvalData(images[:30], labels[:30], images[30:], labels[30:], 3)
    tau = 0.04
    _, scores = extract(teacher, data.test_images)
    kappa = teacher.head.prototype_norms().detach().double().numpy() / tau
    p = teacher.head.bottleneck_dim
    nu = p / 2 - 1
    log_c = nu * np.log(kappa) - (p / 2) * np.log(2 * np.pi) - (np.log(ive(nu, kappa)) + kappa)
    expected = np.bincount((scores.double().numpy() / tau + log_c).argmax(1), minlength=len(kappa)) / 30
    raw = np.bincount(scores.numpy().argmax(1), minlength=len(kappa)) / 30
    assert not np.array_equal(expected, raw)  # the norms change which prototypes the targets favour
    metrics, usage = evaluate_with_usage(teacher, data, ks=(20,), vmf_temperature=tau)
    np.testing.assert_array_equal(usage.numpy(), expected)
    assert metrics["prototypes_in_use"] == (expected > 0).sum()
    _, plain = evaluate_with_usage(teacher, data, ks=(20,))
    np.testing.assert_array_equal(plain.numpy(), raw)
