"""iBOT's block-wise masks over the patch grid of the student's global crops (after BEiT).

Per image: with probability ``unmasked_share`` no mask at all; otherwise a prediction ratio
r ~ U(ratio) and rectangles of random area and aspect ratio (log-uniform in ``aspect``)
placed until r * h * w patches are masked or no rectangle fits. Numpy, seeded by the
caller: the same seed gives the same masks.
"""

from __future__ import annotations

import math

import numpy as np


def _add_block(mask: np.ndarray, budget: float, rng: np.random.Generator, log_aspect: tuple[float, float]) -> int:
    """Mask one rectangle that adds at most ``budget`` new patches (10 attempts); the patches added.

    Draws as iBOT's ``ImageFolderMask`` does, number for number (``random.uniform(a, b)`` is
    ``a + (b - a) * u`` and ``random.randint(a, b)`` is ``integers(a, b + 1)``): the area is
    uniform between the smallest block and the budget in either order, so once the budget is
    below the smallest block the area still lies between the two, as in iBOT.
    """
    h_grid, w_grid = mask.shape
    low = (min(h_grid, w_grid) // 3) ** 2  # iBOT's smallest block
    for _ in range(10):
        area = low + (budget - low) * rng.random()
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (h < h_grid and w < w_grid):
            continue
        top, left = rng.integers(0, h_grid - h + 1), rng.integers(0, w_grid - w + 1)
        block = mask[top : top + h, left : left + w]
        new = h * w - int(block.sum())  # 0 for an empty rectangle (a side rounded to 0): not accepted
        if 0 < new <= budget:
            block[...] = True
            return new
    return 0


def block_mask(
    grid: tuple[int, int], ratio: float, rng: np.random.Generator, aspect: tuple[float, float] = (0.3, 1 / 0.3)
) -> np.ndarray:
    """A bool (h, w) mask with about ``ratio`` of the patches masked in rectangular blocks (never more)."""
    mask = np.zeros(grid, dtype=bool)
    target = ratio * grid[0] * grid[1]
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < target:
        added = _add_block(mask, target - count, rng, log_aspect)
        if added == 0:
            break
        count += added
    return mask


def sample_masks(
    batch: int,
    grid: tuple[int, int],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (0.1, 0.5),
    unmasked_share: float = 0.5,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """(batch, h, w) bool masks: each image unmasked with probability ``unmasked_share``, else block-masked
    at a ratio drawn from ``ratio``."""
    masks = np.zeros((batch, *grid), dtype=bool)
    for i in range(batch):
        if rng.random() >= unmasked_share:
            masks[i] = block_mask(grid, rng.uniform(*ratio), rng, aspect)
    return masks
