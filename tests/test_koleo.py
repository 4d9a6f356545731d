"""KoLeo: against a brute-force reference, its effect (spreading points), and in a training step."""

import math

import numpy as np
import pytest
import torch

from raydino.objectives import koleo_loss
from tests.test_training_step import _random_crops, _setup


def _reference(features: np.ndarray) -> float:
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(x)):
        nearest = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        total += -math.log(nearest + 1e-8)
    return total / len(x)


@pytest.mark.parametrize("n, d", [(2, 3), (7, 5), (32, 16)])
def test_matches_brute_force_nearest_neighbours(n, d):
    features = torch.randn(n, d, dtype=torch.float64) * 3.0
    assert koleo_loss(features).item() == pytest.approx(_reference(features.numpy()), rel=1e-5, abs=1e-6)


def test_descending_it_spreads_a_clustered_batch():
    x = (torch.randn(16, 8) * 0.05 + torch.ones(8)).requires_grad_(True)  # nearly one direction
    def mean_cos(v):
        v = torch.nn.functional.normalize(v.detach(), dim=1)
        return float(((v @ v.T).sum() - len(v)) / (len(v) ** 2 - len(v)))
    before, loss_before = mean_cos(x), koleo_loss(x).item()
    optimizer = torch.optim.SGD([x], lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        koleo_loss(x).backward()
        optimizer.step()
    assert koleo_loss(x).item() < loss_before - 1.0
    assert mean_cos(x) < before - 0.03  # 0.998 -> about 0.955


def test_rejects_a_batch_of_one():
    with pytest.raises(ValueError, match="N >= 2"):
        koleo_loss(torch.randn(1, 4))


def test_training_step_adds_the_weighted_term_and_its_gradient():
    crops = _random_crops(batch=6)
    grads = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        _, student, _, step_fn = _setup(f"loss.koleo_weight={weight}")
        metrics = step_fn(crops, 0, 5)
        grads[weight] = student.backbone.cls_token.grad.clone()
        if weight == 0:
            assert "koleo_loss" not in metrics
            dino_only = metrics["loss"]
    assert metrics["loss"] == pytest.approx(metrics["cls_loss"] + 0.5 * metrics["koleo_loss"], rel=1e-5)
    assert metrics["cls_loss"] == pytest.approx(dino_only, rel=1e-5)  # same weights, same crops
    assert not torch.allclose(grads[0.0], grads[0.5])  # the term reaches the backbone's gradient
    features = student(crops[:2], return_features=True).features
    assert len(features) == 2 and features[0].shape == (6, student.backbone.num_features)


def test_config_rejects_koleo_on_single_image_batches():
    from raydino.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="batch_size_per_worker >= 2"):
        load_config(overrides=["loss.koleo_weight=0.1", "data.batch_size_per_worker=1"])
