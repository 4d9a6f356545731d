"""Weighted k-nearest-neighbour classification on frozen features, as in DINO."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from raydino.eval.data import EvalData


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores (N_test, C): each of the k most cosine-similar training samples votes
    for its label with weight exp(similarity / T)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for chunk in test.split(chunk_size):
        sims, idx = (chunk @ train.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in percent."""
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return 100.0 * (scores.argmax(dim=1) == test_labels).float().mean().item()


def raw_pixel_knn_top1(data: EvalData, k: int = 20, temperature: float = 0.07) -> float:
    """The same kNN on the raw pixels (each image flattened): the honest baseline for a learned feature,
    which on small, centred images such as the digits beats any network at random initialisation."""
    def flat(images: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1)).float()

    return knn_top1(flat(data.train_images), torch.from_numpy(data.train_labels), flat(data.test_images),
                    torch.from_numpy(data.test_labels), data.num_classes, k, temperature)
