"""From the data pipeline's uint8 crops to the network's input, on the training device.

Crops travel as uint8 (a quarter of float32's bytes in Ray's object store); they become
ImageNet-normalised float32 only where the network runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_crops(crops: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """uint8 (B, C, H, W) crops -> float32 ImageNet-normalised, on ``device``; grayscale becomes 3 channels."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for crop in crops:
        x = crop.to(device, non_blocking=True).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append((x - mean) / std)
    return out
