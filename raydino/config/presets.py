"""Named starting points for a run: each lists only what differs from the config defaults.

The defaults (``raydino.config``) are DINO's ``main_dino.py``: ViT-S/16, 65,536 prototypes,
teacher temperature 0.04 without warm-up, lr 5e-4 per 256 images, per-parameter clipping at
3.0. The ImageNet presets follow the published DINO and iBOT run commands; ``cpu_demo`` is
the laptop-sized run behind ``make demo``. A test checks that no preset restates a default.
Plain data, no imports: ``raydino.config`` validates a preset when it is loaded.
"""

from __future__ import annotations

from typing import Any

# multi-crop at 224/96 px runs at roughly 100-200 images/s per CPU actor while a GPU trains on ~1,000:
# the pool starts at one actor per train worker and grows (Ray Data's autoscaling pool) to eight
_IMAGENET = {"source": "imagefolder", "path": "/data/imagenet/train", "crop_actors_per_worker": [1, 8]}
_GPU_WORKERS = {"num_workers": 16, "use_gpu": True, "cpus_per_worker": 8}

# iBOT's published recipes (github.com/bytedance/ibot, README run commands): 8192 prototypes shared
# by [CLS] and patches, 10 local crops, half the images masked at a ratio in (0.1, 0.5) (pred_ratio
# 0 0.3, pred_ratio_var 0 0.2: the mask defaults), patch teacher 0.04 -> 0.07 (the defaults); lr,
# weight decay and momentum at DINO's defaults, as iBOT's run commands leave them
_IBOT_HEAD = {"num_prototypes": 8192}
_IBOT_CROPS = {"local_number": 10}

PRESETS: dict[str, dict[str, Any]] = {
    "imagenet_vit_small": {  # DINO ViT-S/16, 100 epochs (README: teacher 0.07 warmed up over 30 epochs)
        "data": _IMAGENET,
        "loss": {"teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30},
        "scaling": _GPU_WORKERS,
    },
    "imagenet_vit_base": {  # DINO ViT-B/16, 400 epochs
        "model": {"name": "vit_base_patch16_224"},
        "data": {
            **_IMAGENET,
            "batch_size_per_worker": 32,
            "crops": {"local_number": 10, "global_scale": [0.25, 1.0], "local_scale": [0.05, 0.25]},
        },
        "optim": {"epochs": 400, "base_lr": 7.5e-4 * 256 / 1024, "min_lr": 2e-6, "freeze_last_layer_epochs": 3},
        "loss": {"teacher_temp": 0.07, "warmup_teacher_temp_epochs": 50},
        "scaling": {**_GPU_WORKERS, "num_workers": 32},
    },
    "imagenet_ibot_vit_small": {
        "head": {**_IBOT_HEAD, "norm_last_layer": False},
        "loss": {"method": "ibot", "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30},
        "data": {**_IMAGENET, "crops": {**_IBOT_CROPS, "global_scale": [0.25, 1.0], "local_scale": [0.05, 0.25]}},
        "optim": {"epochs": 800},
        "scaling": _GPU_WORKERS,
    },
    "imagenet_ibot_vit_base": {
        "model": {"name": "vit_base_patch16_224"},
        "head": _IBOT_HEAD,
        "loss": {"method": "ibot", "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 50},
        "data": {**_IMAGENET, "crops": {**_IBOT_CROPS, "global_scale": [0.32, 1.0], "local_scale": [0.05, 0.32]}},
        "optim": {"epochs": 400, "freeze_last_layer_epochs": 3},
        "scaling": _GPU_WORKERS,
    },
    "cpu_demo": {
        # DINO-vMF as published (unnormalised prototypes, probability centering, no KoLeo) on the 1,347
        # embedded digits, one Ray Train worker, in ~4 minutes on 2 cores. What makes it learn at this
        # scale (docs/results.md, "Finding the demo's recipe"): views that share their content (global
        # crops of 80-100% of the image, no flip, colour jitter, solarize or local crops: on 8x8 digits DINO's
        # views leave a random ViT nothing to agree on across views, and every run collapsed), a fast
        # teacher (momentum 0.98) and thousands of small steps (batch 32)
        "model": {
            "name": "vit_tiny_patch16_224",
            # digits are 8x8 images: 16 px in 4 px patches (2x2 source pixels each)
            "img_size": 16,
            "drop_path_rate": 0.0,
            "kwargs": {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3},
        },
        "head": {"num_prototypes": 1024, "hidden_dim": 512, "bottleneck_dim": 64, "norm_last_layer": False},
        "loss": {"vmf": True},  # centering auto: probability (DINO-vMF's); --method dino gives DINO's logit centering
        "data": {
            "batch_size_per_worker": 32,
            # batched multi-crop at 16 px costs little per image, so Ray Data's per-call cost
            # counts: 256 images per actor call ran 1.5x the images/s of 64 (benchmarks/multicrop.py)
            "crop_batch_size": 256,
            "crops": {
                "global_size": 16,
                "local_size": 8,
                "local_number": 0,
                "global_scale": [0.8, 1.0],
                "flip_p": 0.0,
                "color_jitter_p": 0.0,
                "solarize_p": 0.0,
                # DINO's 0.1-2 px blur is sized for 224 px crops; on 16 px crops it would erase
                # the digit, so the demo scales sigma with the crop (0.007-0.14 px at 16 px)
                "blur_sigma_per_224px": True,
            },
        },
        "optim": {
            "epochs": 64,
            "base_lr": 5e-3,
            "min_lr": 1e-5,
            "warmup_epochs": 2,
            "momentum_teacher": 0.98,
            "weight_decay_end": 0.1,
            "clip_mode": "global",  # the whole student's gradient norm at 3.0
        },
        "scaling": {"num_workers": 1},
        "eval": {"every_epochs": 8},
    },
}
DEFAULT_PRESET = "cpu_demo"

DESCRIPTIONS: dict[str, str] = {
    "imagenet_vit_small": "DINO ViT-S/16 on ImageNet, 100 epochs, 16 GPU workers (teacher 0.04 -> 0.07 over 30 epochs)",
    "imagenet_vit_base": "DINO ViT-B/16 on ImageNet, 400 epochs, 32 GPU workers, 10 local crops",
    "imagenet_ibot_vit_small": "iBOT ViT-S/16 on ImageNet, 800 epochs, 8192 shared prototypes, 10 local crops",
    "imagenet_ibot_vit_base": "iBOT ViT-B/16 on ImageNet, 400 epochs, 8192 shared prototypes, 10 local crops",
    "cpu_demo": "DINO-vMF with a 4-block ViT at 16 px on the embedded digits, 64 epochs (2,688 steps) in ~5 min on 2 cores",
}
"""One line per preset, for ``raydino presets``."""
