"""raydino's multi-crop draws DINO's distributions: many draws of every view's parameters against DINO's own
transforms (facebookresearch/dino ``DataAugmentationDINO``: torchvision v1 on PIL images, ``random`` for its
blur and solarisation), compared with two-sample Kolmogorov-Smirnov tests (continuous parameters) and
binomial bounds (coins). Tolerances: KS p > 1e-4 (a real difference of a few percent in a distribution
fails at these sample sizes), each coin's rate within 4.5 standard errors of DINO's probability."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as v1

from raydino.config import load_config
from raydino.data.augment import MultiCrop

DRAWS = 3000
IMAGE = (500, 375)  # ImageNet's typical width x height


def _ours(view: int) -> dict[str, np.ndarray]:
    """DRAWS draws of one view's parameters by raydino's crop plans (the batched path's draws, which equal
    torchvision v2's own: tests/test_batched_crops.py)."""
    multicrop = MultiCrop(load_config(preset="imagenet_vit_small").data.crops)
    plan = multicrop._plans[view]
    image = torch.zeros(3, IMAGE[1], IMAGE[0], dtype=torch.uint8)
    names = [type(t).__name__ for t, _ in plan.steps]
    out: dict[str, list[float]] = {k: [] for k in ("area", "log_ratio", "flip", "jitter", "brightness", "contrast",
                                                  "saturation", "hue", "gray", "blur", "sigma", "solarize")}
    torch.manual_seed(0)
    for _ in range(DRAWS):
        params = dict(zip(names, plan.draw(image)))
        crop = params["RandomResizedCrop"]
        out["area"].append(crop["height"] * crop["width"] / (IMAGE[0] * IMAGE[1]))
        out["log_ratio"].append(math.log(crop["width"] / crop["height"]))
        out["flip"].append(params["RandomHorizontalFlip"] is not None)
        jitter = params["ColorJitter"]
        out["jitter"].append(jitter is not None)
        if jitter is not None:
            for key in ("brightness", "contrast", "saturation", "hue"):
                out[key].append(jitter[f"{key}_factor"])
        out["gray"].append(params["RandomGrayscale"] is not None)
        out["blur"].append(params["GaussianBlur"] is not None)
        if params["GaussianBlur"] is not None:
            out["sigma"].append(params["GaussianBlur"]["sigma"][0])
        out["solarize"].append(params.get("RandomSolarize") is not None)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def _dinos(view: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The same draws by DINO's transforms: RandomResizedCrop.get_params, ColorJitter.get_params, and the
    probabilities of main_dino.py (flip 0.5, jitter 0.8, grayscale 0.2, blur 1.0 / 0.1 / 0.5 with radius
    uniform(0.1, 2.0), solarisation 0.2 on the second global view)."""
    size, scale = (224, (0.4, 1.0)) if view < 2 else (96, (0.05, 0.4))
    crop = v1.RandomResizedCrop(size, scale=scale)
    jitter = v1.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    image = Image.new("RGB", IMAGE)
    torch.manual_seed(1)
    rng = random.Random(1)
    out: dict[str, list[float]] = {k: [] for k in ("area", "log_ratio", "brightness", "contrast", "saturation", "hue",
                                                  "sigma")}
    for _ in range(DRAWS):
        _, _, h, w = crop.get_params(image, crop.scale, crop.ratio)
        out["area"].append(h * w / (IMAGE[0] * IMAGE[1]))
        out["log_ratio"].append(math.log(w / h))
        _, b, c, s, hue = v1.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        out["brightness"].append(b)
        out["contrast"].append(c)
        out["saturation"].append(s)
        out["hue"].append(hue)
        out["sigma"].append(rng.uniform(0.1, 2.0))  # DINO's GaussianBlur radius
    coins = {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": (1.0, 0.1, 0.5)[min(view, 2)],
             "solarize": 0.2 if view == 1 else 0.0}
    return {k: np.asarray(v) for k, v in out.items()}, coins


@pytest.mark.parametrize("view", [0, 1, 2], ids=["global_0", "global_1", "local"])
def test_every_view_draws_dinos_parameters(view: int) -> None:
    ours = _ours(view)
    dinos, coins = _dinos(view)
    for key in ("area", "log_ratio", "brightness", "contrast", "saturation", "hue"):
        p = stats.ks_2samp(ours[key], dinos[key]).pvalue
        assert p > 1e-4, (key, p, np.quantile(ours[key], [0.05, 0.5, 0.95]), np.quantile(dinos[key], [0.05, 0.5, 0.95]))
    if len(ours["sigma"]) > 50:  # DINO's PIL blur radius, in pixels, is torchvision's sigma (test_recipe_fidelity)
        assert stats.ks_2samp(ours["sigma"], dinos["sigma"]).pvalue > 1e-4
    for coin, p in coins.items():
        n = len(ours[coin])
        rate = ours[coin].mean()
        bound = 4.5 * math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(rate - p) <= bound + 1e-12, (coin, rate, p)
