"""DINO's multi-crop augmentation with torchvision transforms v2, on uint8 tensors.

Two global crops (different blur / solarisation probabilities, as in DINO) and M
local crops. Outputs stay uint8 (normalisation happens on the training device),
each crop with a fixed shape so batches can be stacked column by column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from raydino.config import CropsConfig


def crop_names(num_local: int) -> list[str]:
    """Column names, global crops first: the order the loss expects."""
    return ["global_0", "global_1"] + [f"local_{i}" for i in range(num_local)]


def _blur(size: int, p: float) -> v2.Transform:
    """Gaussian blur with DINO's sigma range (0.1, 2) at 224 px, scaled to the crop size."""
    scale = size / 224.0
    sigma = (0.1 * scale, 2.0 * scale)
    kernel = max(3, 2 * int(round(3 * sigma[1])) + 1)
    return v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=sigma)], p=p)


def _view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Transform:
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        _blur(size, blur_p),
    ]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return v2.Compose(steps)


class MultiCrop:
    """Image (C, H, W) uint8 -> list of uint8 crops: 2 global, then ``local_number`` local."""

    def __init__(self, crops: CropsConfig) -> None:
        self.names = crop_names(crops.local_number)
        self.global_views = [
            _view(crops.global_size, crops.global_scale, blur_p=1.0, solarize_p=0.0),
            _view(crops.global_size, crops.global_scale, blur_p=0.1, solarize_p=0.2),
        ]
        self.local_view = _view(crops.local_size, crops.local_scale, blur_p=0.5, solarize_p=0.0)
        self.num_local = crops.local_number
        self.to_rgb = v2.RGB()

    def __call__(self, image: Tensor) -> list[Tensor]:
        image = self.to_rgb(image)
        views = [view(image) for view in self.global_views]
        views += [self.local_view(image) for _ in range(self.num_local)]
        return views

    def batch(self, images: Sequence[Tensor], seed: int) -> dict[str, Tensor]:
        """Crops of a batch as {column: (B, 3, S, S) uint8}; the same seed gives the same crops."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per-image ops are tiny: intra-op threads only add overhead (10x here)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                per_image = [self(img) for img in images]
        finally:
            torch.set_num_threads(threads)
        return {name: torch.stack([views[i] for views in per_image]) for i, name in enumerate(self.names)}
