"""Batched multi-crop against torchvision itself: same seed, same crops, bit for bit (the hue, which runs in
OpenCV, within one grey level)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from raydino.config import CropsConfig
from raydino.data import batch_ops
from raydino.data.augment import MultiCrop


def _colour_images(n: int, seed: int) -> list[torch.Tensor]:
    """Colourful images of varied sizes: noise over smooth gradients, so hue and saturation matter."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(n):
        h, w = 20 + 7 * (i % 5), 24 + 5 * (i % 3)
        across = torch.linspace(0, 255, w).expand(h, w)
        down = torch.linspace(0, 255, h)[:, None].expand(h, w)
        base = torch.stack([across, across.flip(-1), down])
        noise = torch.randint(-60, 60, (3, h, w), generator=g)
        images.append((base + noise).clamp(0, 255).to(torch.uint8))
    return images


def _per_image(mc: MultiCrop, images: list[torch.Tensor], seeds: list[int]) -> list[torch.Tensor]:
    views = []
    for image, seed in zip(images, seeds):
        torch.default_generator.manual_seed(seed)
        views.append(mc(image))
    return [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]


@pytest.mark.parametrize(
    "crops, gray",
    [
        (CropsConfig(global_size=16, local_size=8, local_number=4, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4)), True),
        (CropsConfig(global_size=24, local_size=12, local_number=3), False),
        (CropsConfig(global_size=64, local_size=20, local_number=2), False),  # blur kernels 5 and 3
        # steps switched off are left out of the views, batched and per image alike
        (CropsConfig(global_size=16, local_size=8, local_number=2, flip_p=0, color_jitter_p=0, solarize_p=0), True),
    ],
)
def test_crop_batch_equals_torchvision_per_image(crops: CropsConfig, gray: bool) -> None:
    images = _colour_images(48, seed=1)
    if gray:
        images = [im[:1] for im in images]  # single-channel input goes through v2.RGB first
    seeds = [1000 + 7 * i for i in range(len(images))]
    mc = MultiCrop(crops)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    batched = mc.crop_batch(images, seeds)
    assert torch.equal(torch.get_rng_state(), state), "crop_batch must leave the global RNG as it found it"
    reference = _per_image(mc, images, seeds)
    assert len(batched) == 2 + crops.local_number
    for got, want in zip(batched, reference):
        assert got.dtype == torch.uint8 and got.shape == want.shape
        assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} values differ"


def test_crop_batch_does_not_depend_on_batch_composition() -> None:
    mc = MultiCrop(CropsConfig(global_size=24, local_size=12, local_number=2))
    images, seeds = _colour_images(20, seed=2), list(range(20))
    whole = mc.crop_batch(images, seeds)
    order = [7, 3, 19, 0]
    part = mc.crop_batch([images[i] for i in order], [seeds[i] for i in order])
    for w, p in zip(whole, part):
        assert torch.equal(w[order], p)
    other = mc.crop_batch(images, [s + 1 for s in seeds])
    assert not torch.equal(whole[0], other[0]), "a different seed must give different crops"


def test_crop_batch_of_two_images_equals_per_image_over_many_seeds() -> None:
    """Pairs are where a step taken by every row (grayscale: one channel expanded to three, a view that
    cannot be written row by row) meets a later step taken by one row only; 150 pairs hit it many times."""
    mc = MultiCrop(CropsConfig(global_size=16, local_size=8, local_number=2))
    images = _colour_images(2, seed=3)
    for first in range(0, 300, 2):
        seeds = [first, first + 1]
        for got, want in zip(mc.crop_batch(images, seeds), _per_image(mc, images, seeds)):
            assert torch.equal(got, want), f"seeds {seeds}"


def test_crop_batch_checks_lengths_and_handles_empty() -> None:
    mc = MultiCrop(CropsConfig(global_size=16, local_size=8, local_number=1))
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        mc.crop_batch(_colour_images(2, seed=3), [0])
    empty = mc.crop_batch([], [])
    assert [tuple(v.shape) for v in empty] == [(0, 3, 16, 16), (0, 3, 16, 16), (0, 3, 8, 8)]


def _batch(n: int = 12, size: int = 16) -> torch.Tensor:
    return torch.stack([F.resize(im, [size, size]) for im in _colour_images(n, seed=4)])


@pytest.mark.parametrize(
    "ours, theirs, factors",
    [
        (batch_ops.adjust_brightness, F.adjust_brightness, [0.0, 0.6, 1.0, 1.37, 3.0]),
        (batch_ops.adjust_contrast, F.adjust_contrast, [0.0, 0.6, 1.0, 1.37, 3.0]),
        (batch_ops.adjust_saturation, F.adjust_saturation, [0.0, 0.8, 1.0, 1.13, 3.0]),
    ],
)
def test_per_sample_colour_ops_equal_torchvision(ours, theirs, factors: list[float]) -> None:
    batch = _batch(len(factors))
    got = ours(batch, factors)
    want = torch.stack([theirs(image, f) for image, f in zip(batch, factors)])
    assert torch.equal(got, want)
    assert not torch.equal(got[1], batch[1]), "a factor away from identity must change the image"


def _every_colour_sampled(n: int, seed: int) -> torch.Tensor:
    """n random colours plus the edge cases of HSV (greys, black, white, the primaries and secondaries, hues
    near 0 that a negative factor wraps below 0), as (1, 3, 1, N)."""
    g = torch.Generator().manual_seed(seed)
    random = torch.randint(0, 256, (3, n), generator=g, dtype=torch.uint8)
    v = torch.arange(256, dtype=torch.uint8)
    zero, full = torch.zeros_like(v), torch.full_like(v, 255)
    edges = [torch.stack([v, v, v]), torch.stack([full, v, zero]), torch.stack([v, zero, zero]),
             torch.stack([full, zero, v]), torch.stack([zero, v, full]), torch.stack([v, full, v])]
    return torch.cat([random, *edges], dim=1)[None, :, None, :]


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.0371, -1e-7, 0.0, 1e-7, 0.0371, 0.1, 0.5])
def test_hue_is_torchvisions_within_one_grey_level(factor: float) -> None:
    """The hue rotation runs in OpenCV (float32 HSV as torchvision's): over every colour case at DINO's factors
    (|h| <= 0.1) and the extremes, no value is more than one grey level off F.adjust_hue and at most 1e-3 are off
    at all (6e-5 over all 2^24 colours and 48 factors when measured)."""
    colours = _every_colour_sampled(200_000, seed=int(factor * 1e4) + 7)
    got = batch_ops.adjust_hue(colours, [factor])
    want = F.adjust_hue(colours[0], factor)[None]
    diff = (got.int() - want.int()).abs()
    assert got.dtype == torch.uint8 and got.shape == colours.shape
    assert diff.max() <= 1, f"{int(diff.max())} grey levels off torchvision"
    assert (diff > 0).float().mean() <= 1e-3


def test_per_sample_hue_turns_each_crop_by_its_own_factor() -> None:
    factors = [-0.5, -0.1, 0.0, 0.0371, 0.5]
    batch = _batch(len(factors))
    got = batch_ops.adjust_hue(batch, factors)
    for image, f, ours in zip(batch, factors, got):
        assert (ours.int() - F.adjust_hue(image, f).int()).abs().max() <= 1
    assert torch.equal(got[2], batch[2]), "factor 0 leaves the crop as it was"
    assert not torch.equal(got[1], batch[1]), "a factor away from identity must change the image"
    assert batch_ops.adjust_hue(batch[:0], []).shape == (0, *batch.shape[1:])
    with pytest.raises(TypeError, match=r"uint8 RGB crops \(B, 3, H, W\), got torch.float32"):
        batch_ops.adjust_hue(batch.float(), factors)
    with pytest.raises(TypeError, match=r"got torch.uint8 \(5, 1, 16, 16\)"):
        batch_ops.adjust_hue(batch[:, :1], factors)


def test_color_jitter_outside_multicrop_keeps_torchvisions_behaviour() -> None:
    """``augment.ColorJitter`` takes the batched kernels for uint8 RGB only: a float image, a grayscale one and a
    tv_tensors.Image go through torchvision's own kernels (and keep their wrapper)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from raydino.data.augment import ColorJitter

    ours, theirs = ColorJitter(0.4, 0.4, 0.2, 0.1), v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    image = _batch(1)[0]
    for inpt in (image.float() / 255, image[:1], tv_tensors.Image(image)):
        torch.manual_seed(3)
        got = ours(inpt)
        torch.manual_seed(3)
        want = theirs(inpt)
        assert type(got) is type(want) and torch.equal(got, want)


FORKED_AFTER_A_THREAD_POOL = """
import cv2, numpy as np, torch
from torch.utils.data import DataLoader, Dataset
from raydino.data import batch_ops
cv2.setNumThreads(2)
cv2.cvtColor(np.random.rand(2048, 224, 3).astype(np.float32), cv2.COLOR_RGB2HSV)  # starts OpenCV's thread pool
crops = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
class Hue(Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return batch_ops.adjust_hue(crops[i:i + 1], [0.05])[0]
loader = DataLoader(Hue(), batch_size=4, num_workers=2, multiprocessing_context="fork")
print(sum(len(b) for b in loader))
"""


@pytest.mark.timeout(120)
def test_hue_in_forked_dataloader_workers_after_opencvs_thread_pool_started() -> None:
    """A DataLoader forks its workers from a process that may have run OpenCV with threads (the user's code, or
    the hue itself in the main process): set to 1 thread there, OpenCV hung; the hue sets it to sequential (0)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORKED_AFTER_A_THREAD_POOL], check=False, capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0 and done.stdout.strip() == "8", done.stderr[-2000:]


def test_per_sample_blur_equals_torchvision() -> None:
    batch = _batch(4, size=20)
    sigmas = [[0.1, 0.1], [0.7, 0.7], [1.3, 1.3], [2.0, 2.0]]
    got = batch_ops.gaussian_blur(batch, [5, 5], sigmas)
    want = torch.stack([F.gaussian_blur(image, [5, 5], s) for image, s in zip(batch, sigmas)])
    assert torch.equal(got, want)
    assert not torch.equal(got[3], batch[3])


def test_blur_with_subnormal_kernel_tails_equals_torchvision() -> None:
    """DINO's 13-px kernel at sigmas across 0.1-2 px: some kernels' tails are subnormal floats, which the batched
    blur sets to 0 (x86 multiplies subnormals ~100x slower); the crops stay torchvision's, bit for bit."""
    from torchvision.transforms.v2.functional._misc import _get_gaussian_kernel2d

    g = torch.Generator().manual_seed(3)
    sigmas = [[s, s] for s in torch.linspace(0.1, 2.0, 24).tolist()]
    tiny = torch.finfo(torch.float32).tiny
    subnormal = [s for s in sigmas if ((k := _get_gaussian_kernel2d([13, 13], s, torch.float32, torch.device("cpu"))) > 0)
                 .logical_and(k < tiny).any()]
    assert subnormal, "no sigma here gives subnormal weights: the case this test is for is not exercised"
    smooth = F.gaussian_blur(torch.randint(0, 256, (24, 3, 40, 40), dtype=torch.uint8, generator=g), [5, 5], [1.0, 1.0])
    got = batch_ops.gaussian_blur(smooth, [13, 13], sigmas)
    want = torch.stack([F.gaussian_blur(image, [13, 13], s) for image, s in zip(smooth, sigmas)])
    assert torch.equal(got, want)


def test_per_image_views_equal_torchvisions_own_transforms() -> None:
    """``MultiCrop(image)`` blurs and jitters with ``augment.GaussianBlur`` and ``augment.ColorJitter`` (the
    batched kernels); the same views built with torchvision's own ``v2.GaussianBlur`` and ``v2.ColorJitter`` give
    the same crops for the same seed, at DINO's 13-px kernel too: the blur bit for bit, the hue (OpenCV) one grey
    level off on a few values, which a later brightness or contrast factor (<= 1.4) can round to two."""
    from torchvision.transforms import v2

    from raydino.data.augment import ColorJitter, GaussianBlur

    def with_torchvisions(mc: MultiCrop, jitter: bool) -> tuple[list[int], int]:
        """Swap ``mc``'s blurs (and jitters) for torchvision's own; the blurs' kernel sizes and the jitters swapped."""
        kernels, jitters = [], 0
        for view in [*mc.global_views, mc.local_view]:
            for t in view.transforms:
                if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], GaussianBlur):
                    blur = t.transforms[0]
                    t.transforms[0] = v2.GaussianBlur(kernel_size=blur.kernel_size, sigma=blur.sigma)
                    kernels.append(blur.kernel_size[0])
                if jitter and isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], ColorJitter):
                    j = t.transforms[0]
                    t.transforms[0] = v2.ColorJitter(brightness=j.brightness, contrast=j.contrast,
                                                     saturation=j.saturation, hue=j.hue)
                    jitters += 1
        return kernels, jitters

    crops = CropsConfig(global_size=64, local_size=24, local_number=2)
    ours, theirs, theirs_blur_only = MultiCrop(crops), MultiCrop(crops), MultiCrop(crops)
    kernels, jitters = with_torchvisions(theirs, jitter=True)
    assert len(kernels) == 3 and max(kernels) == 13 and jitters == 3  # ours holds the same: built from one config
    assert with_torchvisions(theirs_blur_only, jitter=False) == (kernels, 0)
    off = total = 0
    for seed, image in enumerate(_colour_images(24, seed=5)):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        want = theirs(image)
        torch.manual_seed(seed)
        blur_only = theirs_blur_only(image)
        assert all(torch.equal(a, b) for a, b in zip(got, blur_only)), seed  # the blur: bit for bit
        for a, b in zip(got, want):
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 2, seed
            off, total = off + int((diff > 0).sum()), total + diff.numel()
    assert off <= 1e-3 * total, f"{off} of {total} values differ"


def test_augmentations_switched_off_are_not_applied() -> None:
    """flip_p, color_jitter_p and solarize_p at 0: the views hold no flip, jitter or solarize step, and a
    crop of the whole image without blur's effect on a flat image is the image itself."""
    crops = CropsConfig(global_size=16, local_size=8, local_number=1, global_scale=(1.0, 1.0), flip_p=0,
                        color_jitter_p=0, solarize_p=0)
    mc = MultiCrop(crops)
    kinds = {type(t).__name__ for view in [*mc.global_views, mc.local_view] for t in view.transforms}
    assert not kinds & {"RandomHorizontalFlip", "RandomSolarize"} and "RandomApply" in kinds  # blur's coin
    inner = {type(t.transforms[0]).__name__ for view in mc.global_views for t in view.transforms
             if type(t).__name__ == "RandomApply"}
    assert inner == {"GaussianBlur"}
    default = MultiCrop(CropsConfig(global_size=16, local_size=8, local_number=1))
    assert {"RandomHorizontalFlip", "RandomSolarize"} <= {
        type(t).__name__ for view in default.global_views for t in view.transforms}
    asymmetric = torch.zeros((1, 16, 16), dtype=torch.uint8)
    asymmetric[:, :, :4] = 255  # a bright left edge: a flip would move it to the right
    views = mc.crop_batch([asymmetric] * 8, list(range(8)))
    assert (views[0][:, :, :, :4].float().mean() > 200) and (views[0][:, :, :, -4:].float().mean() < 50)
