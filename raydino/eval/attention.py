"""The last block's [CLS] self-attention of a timm ViT: DINO's attention maps, per head.

timm's ``Attention`` fuses softmax and values (``scaled_dot_product_attention``), so the
weights never exist as a tensor. They are recomputed here from the last block's own
input (captured by a forward pre-hook on ``blocks[-1].attn``) and its own ``qkv``,
``q_norm`` / ``k_norm`` and ``scale``: the same numbers timm multiplies the values with.
Pure torch + matplotlib (no Ray, no MLflow).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn

from raydino.eval.plots import _save
from raydino.models import normalize_crops

DEFAULT_THRESHOLD = 0.6
"""DINO's visualize_attention.py default: keep the patches holding 60% of a head's attention."""


def _last_attention_module(backbone: nn.Module) -> nn.Module:
    blocks = getattr(backbone, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
        raise ValueError(
            f"{type(backbone).__name__} has no timm ViT attention in its last block (blocks[-1].attn.qkv); "
            "attention maps need a timm VisionTransformer"
        )
    if getattr(attn, "gate", None) is not None:  # a gated head is no longer a convex mix of the values
        raise ValueError("the last block's attention is gated; its weights are not an attention map")
    return attn


def has_cls_attention(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a timm ViT with a [CLS] token, i.e. whether it has DINO's attention maps."""
    try:
        _last_attention_module(backbone)
    except ValueError:
        return False
    return getattr(backbone, "cls_token", None) is not None


@torch.no_grad()
def last_block_attention(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) of the last block for normalised ``images`` (B, C, H, W), with the
    input the block's attention saw: ((B, heads, T, T), (B, T, D)); T counts prefix tokens
    ([CLS], registers) first, then the patches row by row."""
    attn = _last_attention_module(backbone)
    captured: dict[str, object] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["x"]
        captured["mask"] = args[1] if len(args) > 1 else kwargs.get("attn_mask")

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = backbone.training
    backbone.eval()
    try:
        backbone.forward_features(images)
    finally:
        handle.remove()
        backbone.train(was_training)
    x = captured["x"]
    assert isinstance(x, Tensor)
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    mask = captured["mask"]
    if isinstance(mask, Tensor):
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.float().softmax(dim=-1), x


def cls_attention_maps(backbone: nn.Module, images: Tensor) -> Tensor:
    """The [CLS] token's attention over the patch tokens, per head, as (B, heads, h, w) on the
    patch grid. Prefix tokens (the [CLS] token itself, registers) are dropped and each head's
    map renormalised to sum to 1, so that maps of models with and without registers compare."""
    if getattr(backbone, "cls_token", None) is None:
        raise ValueError(f"{type(backbone).__name__} has no [CLS] token (class_token=False): no [CLS] attention")
    ph, pw = backbone.patch_embed.patch_size
    height, width = images.shape[-2:]
    if height % ph or width % pw:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}; resize it")
    weights, _ = last_block_attention(backbone, images)
    prefix = backbone.num_prefix_tokens
    cls = weights[:, :, 0, prefix:]
    cls = cls / cls.sum(dim=-1, keepdim=True)
    return cls.reshape(*cls.shape[:2], height // ph, width // pw)


def mass_masks(maps: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Per map (the last two dims), the fewest patches whose attention sums to at least
    ``threshold`` of the map's total: DINO's thresholded masks (visualize_attention.py)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: need 0 < threshold <= 1 (a share of the attention mass)")
    flat = maps.flatten(-2).double()
    flat = flat / flat.sum(dim=-1, keepdim=True)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(dim=-1) - values  # mass of the strictly larger patches
    keep_sorted = before < threshold - 1e-6  # add patches until the mass reaches the threshold (float32 maps)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Patch-grid maps (..., h, w) -> (..., H, W), each patch a block of pixels (nearest, as DINO)."""
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="nearest")
    return out.reshape(*lead, *size)


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W), C = 1 or 3 -> (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 (C, H, W) image with 1 or 3 channels, got shape {image.shape}")
    return np.repeat(image, 3, axis=0).transpose(1, 2, 0) if image.shape[0] == 1 else image.transpose(1, 2, 0)


def _heat(map_: np.ndarray) -> np.ndarray:
    """A map stretched to its own min..max (as DINO's imsave) and coloured with viridis, as uint8 (H, W, 3)."""
    low, span = float(map_.min()), float(map_.max() - map_.min())
    scaled = (map_ - low) / span if span > 0 else np.zeros_like(map_)
    return (matplotlib.colormaps["viridis"](scaled)[..., :3] * 255).round().astype(np.uint8)


def _masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with everything outside ``mask`` half covered in blue (visible on black and on white)."""
    covered = (0.5 * image.astype(np.float32) + 0.5 * np.array([40.0, 70.0, 170.0])).round().astype(np.uint8)
    return np.where(mask[..., None], image, covered)


def write_attention_pngs(
    image: np.ndarray, maps: Tensor, out_dir: str | os.PathLike[str], threshold: float = DEFAULT_THRESHOLD
) -> list[Path]:
    """One image's PNGs, all at the image's size: ``img.png`` (what the model saw),
    ``attn-head{j}.png`` and ``attn-mean.png`` (the patch maps upsampled, each scaled to its
    min..max), ``mask-th{threshold}-head{j}.png`` (the image, the patches outside the mask tinted blue) and
    ``overview.png`` (all of them in one figure, for reading at a glance).

    ``image``: uint8 (C, H, W); ``maps``: (heads, h, w) from ``cls_attention_maps``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rgb = _rgb(image)
    size = rgb.shape[:2]
    heads = upsample(maps, size).numpy()
    mean = upsample(maps.mean(dim=0), size).numpy()
    masks = upsample(mass_masks(maps, threshold).float(), size).numpy() > 0.5
    panels: list[tuple[str, str, np.ndarray]] = [("img.png", "image", rgb)]
    panels += [(f"attn-head{j}.png", f"head {j}", _heat(m)) for j, m in enumerate(heads)]
    panels.append(("attn-mean.png", "mean of heads", _heat(mean)))
    panels += [(f"mask-th{threshold:g}-head{j}.png", f"head {j}: {threshold:.0%} mass", _masked(rgb, m))
               for j, m in enumerate(masks)]
    written = []
    for name, _, pixels in panels:
        Image.fromarray(pixels).save(out / name)
        written.append(out / name)
    cols = len(heads) + 1
    fig = Figure(figsize=(2.0 * cols, 4.2))
    for i, (_, title, pixels) in enumerate(panels):
        row, col = (0, i) if i <= cols else (1, i - cols)  # top: image, heads, mean; bottom: masks
        ax = fig.add_subplot(2, cols + 1, row * (cols + 1) + col + 1)
        ax.imshow(pixels, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    written.append(_save(fig, out / "overview.png"))
    return written


def plot_attention_grid(
    backbone: nn.Module, images: np.ndarray, path: str | os.PathLike[str], threshold: float = DEFAULT_THRESHOLD
) -> Path:
    """A small grid for a run's artifacts: one row per image (uint8 (N, C, H, W), ImageNet-normalised
    here as in evaluation), showing the image, the mean [CLS] attention, each head's map and the
    mean map's ``threshold`` mass mask. Images are cropped to whole patches (a run's crop size need not be)."""
    ph, pw = backbone.patch_embed.patch_size
    height, width = images.shape[-2] // ph * ph, images.shape[-1] // pw * pw
    top, left = (images.shape[-2] - height) // 2, (images.shape[-1] - width) // 2
    images = np.ascontiguousarray(images[..., top : top + height, left : left + width])
    maps = cls_attention_maps(backbone, normalize_crops([torch.from_numpy(images)], "cpu")[0])
    n, heads = maps.shape[:2]
    size = tuple(images.shape[-2:])
    cols = heads + 3
    fig = Figure(figsize=(1.6 * cols, 1.7 * n + 0.3))
    for i in range(n):
        rgb = _rgb(images[i])
        up = upsample(maps[i], size).numpy()
        mean = upsample(maps[i].mean(dim=0), size).numpy()
        mask = upsample(mass_masks(maps[i].mean(dim=0), threshold).float(), size).numpy() > 0.5
        row = [("image", rgb), ("mean", _heat(mean))]
        row += [(f"head {j}", _heat(m)) for j, m in enumerate(up)]
        row.append((f"mean: {threshold:.0%} mass", _masked(rgb, mask)))
        for j, (title, pixels) in enumerate(row):
            ax = fig.add_subplot(n, cols, i * cols + j + 1)
            ax.imshow(pixels, interpolation="nearest")
            if i == 0:
                ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("teacher: last block [CLS] attention", fontsize=9)
    return _save(fig, path)
