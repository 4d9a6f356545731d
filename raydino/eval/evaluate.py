"""Evaluate a (teacher) network on held-out labelled images: kNN, linear probe, prototypes.

Pure torch / scikit-learn: used per epoch on rank 0 of the training loop and at the
end of a run by the driver and by ``raydino evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from raydino.eval.data import EvalData
from raydino.eval.knn import knn_top1
from raydino.eval.probe import linear_probe_top1
from raydino.eval.prototypes import prototype_utilisation
from raydino.models import MultiCropNetwork, normalize_crops
from raydino.objectives.vmf import vmf_logits


@torch.no_grad()
def extract(
    network: MultiCropNetwork, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Backbone [CLS] features and head scores of whole images, in eval mode, on CPU."""
    was_training = network.training
    network.eval()
    features, scores = [], []
    try:
        for i in range(0, len(images), batch_size):
            x = normalize_crops([torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))], device)[0]
            f = network.backbone(x)
            features.append(f.float().cpu())
            scores.append(network.head(f).float().cpu())
    finally:
        network.train(was_training)
    return torch.cat(features), torch.cat(scores)


def evaluate_network(
    network: MultiCropNetwork,
    data: EvalData,
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (10, 20, 100),
    temperature: float = 0.07,
    linear_probe: bool = False,
    vmf_temperature: float | None = None,
) -> dict[str, float]:
    """knn_top1 (k=20) and knn_top1_k{k}, prototypes_in_use and usage entropy on the test split."""
    return evaluate_with_usage(network, data, device, ks, temperature, linear_probe, vmf_temperature)[0]


def evaluate_with_usage(
    network: MultiCropNetwork,
    data: EvalData,
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (10, 20, 100),
    temperature: float = 0.07,
    linear_probe: bool = False,
    vmf_temperature: float | None = None,
) -> tuple[dict[str, float], Tensor]:
    """``evaluate_network``'s metrics and the prototype usage histogram (K,), from one feature pass.

    ``vmf_temperature``: the teacher's temperature of a DINO-vMF run; prototype usage is then the argmax
    of its vMF logits w_k . y / tau + log C_p(||w_k|| / tau), the prototype its targets favour, not of the
    raw scores (the same argmax only when every prototype has the same norm)."""
    train_f, _ = extract(network, data.train_images, device)
    test_f, test_scores = extract(network, data.test_images, device)
    train_y, test_y = torch.from_numpy(data.train_labels), torch.from_numpy(data.test_labels)
    metrics: dict[str, float] = {}
    for k in sorted(set(ks) | {20}):
        metrics[f"knn_top1_k{k}"] = knn_top1(train_f, train_y, test_f, test_y, data.num_classes, k, temperature)
    metrics["knn_top1"] = metrics["knn_top1_k20"]
    if vmf_temperature is not None:
        norms = network.head.prototype_norms().detach().float().cpu()
        test_scores = vmf_logits(test_scores, norms, vmf_temperature, network.head.bottleneck_dim)
    usage = prototype_utilisation(test_scores)
    metrics["prototypes_in_use"] = float(usage["distinct"])
    metrics["prototype_usage_entropy"] = float(usage["entropy"])
    if linear_probe:
        metrics["linear_probe_top1"] = linear_probe_top1(train_f, train_y, test_f, test_y)
    return metrics, usage["usage"]
