"""Image folders the tests train on: a small one with a corrupt file, and one at ImageNet's geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def small_imagefolder(root: Path) -> Path:
    """79 good 24x24 PNGs in two classes and one corrupt file: 80 files listed, 79 rows per pass."""
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(40 - c):
            img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            img[:, :, c] = 255
            path = root / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return root


def imagenet_like_jpegs(root: Path, per_class: int, seed: int = 0) -> Path:
    """JPEGs of ImageNet's typical geometry (about 375x500, landscape and portrait, quality 90) cut
    from real photos (scikit-learn's two sample images, one class each), in ``root/<class>/``."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    for name, photo in zip(("china", "flower"), photos.images):
        (root / name).mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]  # 427 x 640
        for i in range(per_class):
            h, w = (int(rng.integers(333, 428)), int(rng.integers(440, 561)))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            crop = photo[top : top + h, left : left + w]
            if i % 4 == 3:  # a quarter portrait, as in ImageNet
                crop = np.ascontiguousarray(crop.transpose(1, 0, 2))
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{name}_{i:04d}.jpg", quality=90)
    return root
