"""The labelled held-out images that evaluation runs on (loaded by ``raydino.data.eval_data``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvalData:
    """uint8 (N, C, H, W) images at the global crop size, with integer labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
