"""``raydino attention``: DINO's attention maps of a checkpoint's teacher or an exported backbone.

Loads the backbone and the image size it was evaluated at from either source, preprocesses
image files the way the evaluation data is (RGB, shorter side resized, centre crop,
ImageNet normalisation) and writes the PNGs of ``raydino.eval.attention``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from raydino.eval.attention import DEFAULT_THRESHOLD, cls_attention_maps, write_attention_pngs
from raydino.models import normalize_crops
from raydino.train.export import IMAGE_SIZE_KEY, MODEL_KEY, TIMM_KWARGS_KEY, load_teacher


@dataclass
class LoadedBackbone:
    backbone: nn.Module
    image_size: int
    """The size the run evaluated at (data.crops.global_size), else the model's img_size."""


def load_backbone(path: str | os.PathLike[str]) -> LoadedBackbone:
    """The teacher backbone (eval mode, CPU) of a checkpoint_* directory or of a ``raydino export`` file."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; pass a checkpoint_* directory or a .safetensors export")
    if source.is_dir():
        teacher, cfg, _ = load_teacher(source)
        return LoadedBackbone(teacher.backbone.eval(), cfg.data.crops.global_size)
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(source), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{source} is not a safetensors file ({exc}); pass a file written by raydino export") from None
    if MODEL_KEY not in meta or TIMM_KWARGS_KEY not in meta:
        raise ValueError(f"{source} has no raydino metadata ({MODEL_KEY}); pass a file written by raydino export")
    kwargs = json.loads(meta[TIMM_KWARGS_KEY])
    backbone = timm.create_model(meta[MODEL_KEY], pretrained=False, **kwargs)
    try:
        backbone.load_state_dict(load_file(str(source)))
    except RuntimeError as exc:
        raise ValueError(f"{source}: the weights do not match {meta[MODEL_KEY]} {kwargs} ({str(exc)[:300]})") from None
    size = int(meta.get(IMAGE_SIZE_KEY, kwargs.get("img_size", 224)))
    return LoadedBackbone(backbone.eval(), size)


def read_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """An image file as uint8 (3, size, size): RGB (grayscale and palettes converted), shorter side
    resized to ``size``, centre crop; the same steps as the evaluation data's decoding."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import v2

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"image {file} does not exist or is not a file")
    try:
        with Image.open(file) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{file} is not an image PIL can read ({exc}); pass PNG, JPEG or another image file") from None
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    return transform(rgb).numpy()


def write_attention(
    model_path: str | os.PathLike[str],
    images: list[str],
    out_dir: str | os.PathLike[str],
    threshold: float = DEFAULT_THRESHOLD,
    size: int | None = None,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """For each image, ``out_dir/<stem>/`` with the PNGs of ``write_attention_pngs``; returns those folders.
    ``device``: where the backbone runs (``cuda`` for the GPU; the maps come back to the CPU for the PNGs)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold {threshold}: need 0 < threshold <= 1 (a share of the attention mass)")
    loaded = load_backbone(model_path)
    backbone = loaded.backbone.to(device)
    size = size or loaded.image_size
    patch = loaded.backbone.patch_embed.patch_size
    if size < 1 or size % patch[0] or size % patch[1]:
        raise ValueError(f"--size {size} is not a multiple of the patch size {patch[0]}; pick one that is")
    arrays = [read_image(p, size) for p in images]  # every file checked before anything is written
    out = Path(out_dir)
    folders: list[Path] = []
    used: set[str] = set()
    for path, image in zip(images, arrays):
        stem = re.sub(r"[^\w.-]", "_", Path(path).stem) or "image"
        name, i = stem, 1
        while name in used:  # the same file name in two folders
            i += 1
            name = f"{stem}-{i}"
        used.add(name)
        x = normalize_crops([torch.from_numpy(image).unsqueeze(0)], torch.device(device))[0]
        maps = cls_attention_maps(backbone, x)[0].cpu()
        write_attention_pngs(image, maps, out / name, threshold)
        folders.append(out / name)
    return folders
