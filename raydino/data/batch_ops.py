"""torchvision's photometric kernels applied to a batch of crops with one parameter per crop.

torchvision's functional kernels take one factor per call, while DINO draws a factor per
crop; called crop by crop at small sizes they cost far more in Python and dispatch than in
arithmetic. These functions do the same arithmetic as torchvision's uint8 kernels (same
formulas, same float32 rounding, fused multiply-add where torchvision's ``add_(alpha=)``
fuses) once per batch; the hue rotation runs in OpenCV's fused colour conversion instead (one grey
level off torchvision's on a few values in 10^5). ``tests/test_batched_crops.py`` compares them with
torchvision crop by crop. No Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._misc import _get_gaussian_kernel2d

# torchvision has no per-sample variants of these kernels; its private blur-kernel helper already
# works per sample, so it is reused rather than re-derived.


def _factors(values: Sequence[float], ndim: int = 4) -> tuple[Tensor, Tensor]:
    """(f, 1 - f) as float32 broadcastable to a batch, each rounded from float64 as torchvision's scalars are."""
    f = torch.tensor(list(values), dtype=torch.float64)
    shape = (-1,) + (1,) * (ndim - 1)
    return f.to(torch.float32).view(shape), (1.0 - f).to(torch.float32).view(shape)


def _blend(image: Tensor, other: Tensor, ratio: Sequence[float]) -> Tensor:
    """torchvision's ``_blend`` (``image * r + other * (1 - r)``, clamped) with ``r`` per sample, uint8 out."""
    r, one_minus_r = _factors(ratio)
    # addcmul fuses other * (1 - r) + image * r as torchvision's add_(other, alpha=1 - r) does
    return torch.addcmul(image.mul(r), other, one_minus_r).clamp_(0, 255).to(torch.uint8)


def _gray_floor(image: Tensor) -> Tensor:
    """floor of ITU-R 601 luma, float32 (B, 1, H, W): what contrast and saturation blend against."""
    return F.rgb_to_grayscale(image, num_output_channels=1).to(torch.float32)


def adjust_brightness(image: Tensor, factors: Sequence[float]) -> Tensor:
    """Per-sample ``F.adjust_brightness`` on uint8 (B, 3, H, W)."""
    return image.mul(_factors(factors)[0]).clamp_(0, 255).to(torch.uint8)


def adjust_contrast(image: Tensor, factors: Sequence[float]) -> Tensor:
    """Per-sample ``F.adjust_contrast``: blend with each image's mean luma."""
    mean = torch.mean(_gray_floor(image), dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factors)


def adjust_saturation(image: Tensor, factors: Sequence[float]) -> Tensor:
    """Per-sample ``F.adjust_saturation``: blend with each image's luma."""
    return _blend(image, _gray_floor(image), factors)


def adjust_hue(image: Tensor, factors: Sequence[float]) -> Tensor:
    """Per-sample ``F.adjust_hue``: rotate the hue in HSV space by each factor (in turns).

    torchvision's float32 HSV (hue in turns, ``x / 255`` in, ``x * 255.999`` truncated out) with OpenCV's
    fused float32 ``cvtColor`` in place of torchvision's ~30 tensor passes: 8-11x faster, the largest step
    of multi-crop before (46% of ``crop_batch`` at ImageNet geometry). Only float rounding differs: over
    all 2^24 colours and 48 factors, 6e-5 of the values are one grey level off torchvision's, none more
    (``tests/test_batched_crops.py`` checks a stated bound). OpenCV runs sequentially: the first call sets
    ``cv2.setNumThreads(0)``, a process-wide OpenCV setting (crops are parallel across processes instead).
    """
    if image.dtype != torch.uint8 or image.ndim != 4 or image.shape[1] != 3:
        raise TypeError(f"adjust_hue takes uint8 RGB crops (B, 3, H, W), got {image.dtype} {tuple(image.shape)}")
    b, _, h, w = image.shape
    if image.numel() == 0:
        return image.clone()
    if cv2.getNumThreads() != 1:
        # sequential, as the crops' torch ops run (one thread per crop actor or DataLoader worker); 0, not 1: a
        # forked DataLoader worker whose parent had started OpenCV's thread pool hangs when set to 1 thread
        cv2.setNumThreads(0)
    # one copy, straight into a C-ordered (B, H, W, 3) float32 array whatever the crops' memory layout
    rgb = image.permute(0, 2, 3, 1).numpy().astype(np.float32, order="C").reshape(b * h, w, 3)
    np.multiply(rgb, np.float32(1 / 255), out=rgb)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # hue in degrees [0, 360)
    hue = hsv.reshape(b, h * w, 3)[..., 0]  # a view: the shift below writes into hsv
    # OpenCV wraps hues >= 360 itself, not negative ones
    hue += _factors(factors, ndim=2)[0].numpy() * np.float32(360)
    np.add(hue, np.float32(360), out=hue, where=hue < 0)
    out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    np.multiply(out, np.float32(255.999), out=out)  # torchvision's to_dtype(uint8, scale=True): 255 + 1 - 1e-3
    np.clip(out, 0, 255, out=out)  # float error past 1.0 must not wrap around in uint8
    return torch.from_numpy(out.astype(np.uint8).reshape(b, h, w, 3)).permute(0, 3, 1, 2)


def gaussian_blur(image: Tensor, kernel_size: Sequence[int], sigmas: Sequence[Sequence[float]]) -> Tensor:
    """Per-sample ``F.gaussian_blur``: one grouped convolution with each sample's own kernel."""
    b, c, h, w = image.shape
    kernels = torch.stack([_get_gaussian_kernel2d(list(kernel_size), list(s), torch.float32, image.device) for s in sigmas])
    # A small sigma's tails underflow into subnormal floats (DINO's sigma is 0.1-2 px in a 13-px kernel), and
    # x86 multiplies subnormals ~100x slower: the convolution took 4x (224 px) to 9x (96 px) longer than with
    # those weights at 0. Each is below 1.2e-38, so its product with a pixel (<= 255) is too small to change
    # the float32 sum the crop is rounded from: the crops stay torchvision's, bit for bit (tested).
    kernels = torch.where(kernels < torch.finfo(torch.float32).tiny, 0.0, kernels)
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)  # (B * C, 1, kh, kw), the sample's kernel per channel
    pad = [kernel_size[0] // 2, kernel_size[0] // 2, kernel_size[1] // 2, kernel_size[1] // 2]
    padded = torch.nn.functional.pad(image.to(torch.float32), pad, mode="reflect")
    out = torch.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, h, w).round_().to(torch.uint8)
