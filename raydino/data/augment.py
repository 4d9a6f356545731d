"""DINO's multi-crop augmentation with torchvision transforms v2, on uint8 tensors.

Two global crops (different blur / solarisation probabilities, as in DINO) and M
local crops. Outputs stay uint8 (normalisation happens on the training device),
each crop with a fixed shape so batches can be stacked column by column.

Two ways to run the same views: ``MultiCrop(image)`` runs torchvision's pipelines on one
image (what a DataLoader worker does); ``MultiCrop.crop_batch`` draws every image's
parameters from the same pipelines in torchvision's own order (so a seed gives the same
crops both ways) and then applies each step once per batch (``raydino.data.batch_ops``),
which at DINO's small crop sizes costs a fraction of the per-image calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from raydino.config import CropsConfig
from raydino.data import batch_ops

# transforms that draw their own coin (torch.rand(1) >= p) before their parameters
_COIN_TRANSFORMS = (v2.RandomHorizontalFlip, v2.RandomGrayscale, v2.RandomSolarize)


def crop_names(num_local: int) -> list[str]:
    """Column names, global crops first: the order the loss expects."""
    return ["global_0", "global_1"] + [f"local_{i}" for i in range(num_local)]


def blur_sigma(size: int, crops: CropsConfig) -> tuple[float, float]:
    """The blur sigma range a crop of ``size`` px gets: DINO's 0.1-2 px on every crop (PIL's radius at
    224 and 96 px alike), or, with ``blur_sigma_per_224px``, that range scaled by size / 224 for tiny images."""
    lo, hi = crops.blur_sigma
    scale = size / 224.0 if crops.blur_sigma_per_224px else 1.0
    return (lo * scale, hi * scale)


def _plain_uint8_image(inpt: Any) -> bool:
    """A plain uint8 (C, H, W) tensor, what ``MultiCrop`` passes: the batched kernels take it. Anything else (a
    float image, a ``tv_tensors.Image``, whose wrapper torchvision's kernels keep) goes to torchvision's own."""
    return type(inpt) is Tensor and inpt.ndim == 3 and inpt.dtype == torch.uint8


class GaussianBlur(v2.GaussianBlur):
    """torchvision's ``GaussianBlur`` (same parameters, same draws, the same crops bit for bit) blurring a uint8
    image with ``batch_ops.gaussian_blur``, whose kernel leaves out subnormal weights: the image-by-image path
    (``raydino pretrain --local``) blurs as fast as the batched one (4-9x faster than torchvision's on CPUs
    that multiply subnormals slowly)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if _plain_uint8_image(inpt):
            return batch_ops.gaussian_blur(inpt.unsqueeze(0), self.kernel_size, [params["sigma"]])[0]
        return super().transform(inpt, params)


class ColorJitter(v2.ColorJitter):
    """torchvision's ``ColorJitter`` (same parameters, same draws) adjusting a uint8 image with ``batch_ops``'
    kernels, so that the image-by-image views equal ``crop_batch``'s bit for bit: torchvision's own kernels
    for brightness, contrast and saturation, OpenCV's colour conversion for the hue (one grey level off
    torchvision's on a few values in 10^5, and 8-11x faster)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if _plain_uint8_image(inpt) and inpt.shape[0] == 3:  # RGB: a grayscale image keeps torchvision's kernels
            return _color_jitter(inpt.unsqueeze(0), [params])[0]
        return super().transform(inpt, params)


def _blur(size: int, p: float, crops: CropsConfig) -> v2.Transform:
    """Gaussian blur applied with probability ``p``; the kernel spans 3 sigma of the largest sigma."""
    sigma = blur_sigma(size, crops)
    kernel = max(3, 2 * round(3 * sigma[1]) + 1)
    return v2.RandomApply([GaussianBlur(kernel_size=kernel, sigma=sigma)], p=p)


def _view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, crops: CropsConfig) -> v2.Transform:
    """DINO's view: crop, flip, colour jitter, grayscale, blur (and solarize). A step whose probability is 0
    is left out, so its coin is not drawn (the other steps' draws stay as DINO's)."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
    ]
    if crops.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=crops.flip_p))
    if crops.color_jitter_p > 0:
        steps.append(v2.RandomApply([ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                    p=crops.color_jitter_p))
    steps += [v2.RandomGrayscale(p=0.2), _blur(size, blur_p, crops)]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return v2.Compose(steps)


class MultiCrop:
    """Image (C, H, W) uint8 -> list of uint8 crops: 2 global, then ``local_number`` local."""

    def __init__(self, crops: CropsConfig) -> None:
        self.names = crop_names(crops.local_number)
        self.global_views = [
            _view(crops.global_size, crops.global_scale, blur_p=1.0, solarize_p=0.0, crops=crops),
            _view(crops.global_size, crops.global_scale, blur_p=0.1, solarize_p=crops.solarize_p, crops=crops),
        ]
        self.local_view = _view(crops.local_size, crops.local_scale, blur_p=0.5, solarize_p=0.0, crops=crops)
        self.num_local = crops.local_number
        self.to_rgb = v2.RGB()
        self._plans = [_ViewPlan(view) for view in self.global_views] + [_ViewPlan(self.local_view)] * self.num_local

    def __call__(self, image: Tensor) -> list[Tensor]:
        image = self.to_rgb(image)
        views = [view(image) for view in self.global_views]
        views += [self.local_view(image) for _ in range(self.num_local)]
        return views

    def crop_batch(self, images: Sequence[Tensor], seeds: Sequence[int]) -> list[Tensor]:
        """Crops of each image under its own seed, as one (B, 3, S, S) uint8 tensor per view (``crop_names`` order).

        Image i gets exactly the crops ``self(images[i])`` gives after
        ``torch.default_generator.manual_seed(seeds[i])``; the global RNG state is restored.
        """
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        rgb = [_channels_last(self.to_rgb(image)) for image in images]
        params: list[list[list[dict[str, Any] | None]]] = []  # [image][view][step]
        with torch.random.fork_rng(devices=[]):
            for image, seed in zip(rgb, seeds):
                torch.default_generator.manual_seed(seed)
                params.append([plan.draw(image) for plan in self._plans])
        return [plan.apply(rgb, [p[v] for p in params]) for v, plan in enumerate(self._plans)]


def _channels_last(image: Tensor) -> Tensor:
    """The same (3, H, W) image laid out channel-last in memory: torchvision's uint8 antialiased resize works
    channel-last, so each crop of a CHW-contiguous image was copied into that layout first; one copy per image
    instead of one per crop halves the crops' time at ImageNet geometry (same values)."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


class _ViewPlan:
    """One view's pipeline as steps: draws their parameters per image, applies them per batch."""

    def __init__(self, view: v2.Compose) -> None:
        self.steps: list[tuple[v2.Transform, float | None]] = []  # (transform, probability it runs or None)
        for t in view.transforms:
            if isinstance(t, v2.RandomApply):
                if len(t.transforms) != 1 or isinstance(t.transforms[0], _COIN_TRANSFORMS):
                    raise TypeError("batched crops support RandomApply around one transform without its own coin")
                self.steps.append((t.transforms[0], t.p))
            else:
                self.steps.append((t, t.p if isinstance(t, _COIN_TRANSFORMS) else None))
        first = self.steps[0][0]
        if not isinstance(first, v2.RandomResizedCrop) or self.steps[0][1] is not None:
            raise TypeError("a batched view starts with RandomResizedCrop: it fixes the crop size")
        self.crop = first
        self.placeholder = torch.empty((3, *first.size), dtype=torch.uint8)  # what later steps see (shape only)

    def draw(self, image: Tensor) -> list[dict[str, Any] | None]:
        """Each step's parameters for ``image`` (None: its coin said skip), drawn as torchvision's forward draws them."""
        drawn: list[dict[str, Any] | None] = []
        for i, (t, p) in enumerate(self.steps):
            if p is not None and torch.rand(1) >= p:
                drawn.append(None)
            else:
                drawn.append(t.make_params([image if i == 0 else self.placeholder]))
        return drawn

    def apply(self, images: Sequence[Tensor], params: Sequence[list[dict[str, Any] | None]]) -> Tensor:
        if not images:
            return self.placeholder.new_empty((0, *self.placeholder.shape))
        batch = torch.stack([self.crop.transform(img, p[0]) for img, p in zip(images, params)])
        for step, (t, _) in enumerate(self.steps[1:], start=1):
            chosen = [i for i, p in enumerate(params) if p[step] is not None]
            if chosen:
                batch = _update_rows(batch, chosen, partial(_apply_batched, t), [params[i][step] for i in chosen])
        return batch


def _update_rows(batch: Tensor, chosen: list[int], fn: Callable[[Tensor, list[Any]], Tensor], args: list[Any]) -> Tensor:
    """``batch[chosen] = fn(batch[chosen], args)``, without advanced indexing: on uint8 crops ``index_select`` and a
    copy per row are ~20x and ~12x faster than ``batch[index]`` and its assignment (they were a quarter of
    ``crop_batch``'s CPU at ImageNet geometry). Same values, bit for bit."""
    if len(chosen) == len(batch):
        return fn(batch, args)
    if 0 in batch.stride():  # an expanded view (grayscale of every row: one channel seen three times)
        batch = batch.contiguous()
    rows = fn(batch.index_select(0, torch.tensor(chosen)), args)
    for row, i in enumerate(chosen):
        batch[i].copy_(rows[row])
    return batch


def _apply_batched(t: v2.Transform, batch: Tensor, params: list[dict[str, Any]]) -> Tensor:
    """One step on the crops that drew it, each with its own parameters."""
    if isinstance(t, v2.RandomHorizontalFlip):
        return batch.flip(-1)
    if isinstance(t, v2.RandomGrayscale):
        return v2.functional.rgb_to_grayscale(batch, num_output_channels=3)
    if isinstance(t, v2.RandomSolarize):
        return v2.functional.solarize(batch, threshold=t.threshold)
    if isinstance(t, v2.GaussianBlur):
        return batch_ops.gaussian_blur(batch, t.kernel_size, [p["sigma"] for p in params])
    if isinstance(t, v2.ColorJitter):
        return _color_jitter(batch, params)
    # anything else: torchvision per crop (same result, no batching)
    return torch.stack([t.transform(crop, p) for crop, p in zip(batch, params)])


_JITTER_OPS: list[tuple[str, Callable[[Tensor, Sequence[float]], Tensor]]] = [
    ("brightness_factor", batch_ops.adjust_brightness),
    ("contrast_factor", batch_ops.adjust_contrast),
    ("saturation_factor", batch_ops.adjust_saturation),
    ("hue_factor", batch_ops.adjust_hue),
]


def _color_jitter(batch: Tensor, params: list[dict[str, Any]]) -> Tensor:
    """ColorJitter with each crop's own factors and its own order of the four adjustments."""
    order = torch.stack([p["fn_idx"] for p in params])  # (B, 4): crop b's k-th adjustment
    for k in range(order.shape[1]):
        for op, (name, fn) in enumerate(_JITTER_OPS):
            chosen = [i for i in (order[:, k] == op).nonzero().flatten().tolist() if params[i][name] is not None]
            if chosen:
                batch = _update_rows(batch, chosen, fn, [params[i][name] for i in chosen])
    return batch
