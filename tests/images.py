"""An image folder the tests train on: small, with a corrupt file (ImageNet's geometry: raydino.commands.rehearsal)."""

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
