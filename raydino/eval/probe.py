"""Linear-probe top-1 on frozen features (logistic regression, scikit-learn).

Features are L2-normalised per sample and then multiplied by sqrt(dim):
- L2 normalisation keeps only the direction, the same geometry the kNN eval
  (cosine similarity) uses, so the probe is insensitive to the feature-norm drift
  that differs between DINO and DINO-vMF arms and between checkpoints;
- the sqrt(dim) rescale gives each coordinate RMS 1, so ``C`` means the same
  regularisation strength whatever the backbone width and L-BFGS is well conditioned.
Standardisation was not chosen because its per-dimension statistics, fitted on the
train split, would reweight directions and so no longer probe the same geometry as kNN.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _normalise(features: ArrayLike) -> np.ndarray:
    """Unit L2 norm per row, times sqrt(dim), in float64 (see the module docstring)."""
    x = _to_numpy(features).astype(np.float64, copy=False)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12) * math.sqrt(x.shape[1])


def linear_probe_top1(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    max_iter: int = 1000,
    C: float = 1.0,
) -> float:
    """Top-1 accuracy in percent of a multinomial logistic regression fitted on frozen
    train features and scored on test features; a cheap stand-in for the paper's linear eval."""
    x_train, x_test = _normalise(train_features), _normalise(test_features)
    y_train, y_test = _to_numpy(train_labels).reshape(-1), _to_numpy(test_labels).reshape(-1)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("features and labels must have the same number of rows")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train/test feature dims differ: {x_train.shape[1]} vs {x_test.shape[1]}")
    # imported here: every training worker imports this module for its kNN (raydino.eval.evaluate), only the
    # final evaluation fits a probe, and scikit-learn costs each worker ~0.8 s of CPU at start-up
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(x_train, y_train)
    return 100.0 * float(np.mean(clf.predict(x_test) == y_test))
