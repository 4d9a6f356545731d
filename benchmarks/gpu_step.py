"""One full training step (student and teacher forward over the multi-crop views, loss, backward,
optimizer, EMA) on synthetic crops already on the device: images/s, step time, peak memory, MFU.

``--preset imagenet_vit_small`` / ``imagenet_vit_base`` at their batch per worker and crop layout;
``--compile`` eager vs torch.compile, ``--bf16`` (CUDA only) fp32 vs bf16 autocast. FLOPs per step
are counted analytically (``step_flops``: patch embedding, attention and MLP of every block, the
projection head and the prototypes, for 2 global + N local crops; the student's forward and
backward, 3x its forward, plus the teacher's forward on the global crops), and MFU is that over
``--peak-tflops`` (dense, per device: A100 312 bf16 / 19.5 fp32, H100 SXM 989 bf16 / 67 fp32,
H200 989 bf16 / 67 fp32; check your card's sheet). ``--tiny`` runs a 1-block model for the tests.

Step time: median of ``--steps`` after ``--warmup`` (compilation happens in the warm-up).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from raydino.config import Config, load_config
from raydino.step import DINOStep

TINY = ["model.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", "head.num_prototypes=64",
        "head.hidden_dim=64", "head.bottleneck_dim=16", "data.crops.local_number=2", "data.batch_size_per_worker=4",
        "data.crops.global_size=32", "data.crops.local_size=16"]


def vit_forward_flops(image_size: int, patch: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs (2 per multiply-add) of one image through a timm ViT: patch embedding, then per block
    qkv, attention scores and weighted sum, projection, MLP; norms, softmax and adds left out."""
    patches = (image_size // patch) ** 2
    tokens = patches + 1
    embed = 2 * patches * (3 * patch * patch) * dim
    linear = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * dim
    return embed + depth * (linear + attention)


def head_flops(dim: int, hidden: int, bottleneck: int, layers: int, prototypes: int) -> float:
    """FLOPs of the projection MLP (``layers`` linear layers dim -> hidden ... -> bottleneck) and the
    prototype layer, for one [CLS] vector."""
    sizes = [dim] + [hidden] * (layers - 1) + [bottleneck]
    return 2 * sum(a * b for a, b in itertools.pairwise(sizes)) + 2 * bottleneck * prototypes


def step_flops(cfg: Config, dim: int, depth: int, patch: int, batch: int) -> float:
    crops = cfg.data.crops
    head = head_flops(dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim, cfg.head.num_layers, cfg.head.num_prototypes)
    global_one = vit_forward_flops(crops.global_size, patch, dim, depth) + head
    local_one = vit_forward_flops(crops.local_size, patch, dim, depth) + head
    student_forward = batch * (2 * global_one + crops.local_number * local_one)
    teacher_forward = batch * 2 * global_one
    return 3 * student_forward + teacher_forward


def run(cfg: Config, device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    step_fn = DINOStep.build(cfg, device)
    batch, crops = cfg.data.batch_size_per_worker, cfg.data.crops
    views = [torch.randn(batch, 3, crops.global_size, crops.global_size, device=device) for _ in range(2)]
    views += [torch.randn(batch, 3, crops.local_size, crops.local_size, device=device) for _ in range(crops.local_number)]
    total = warmup + steps
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step_fn(views, step, total)  # its metrics are floats: the step has finished on the device
        times.append(time.perf_counter() - start)
    backbone = step_fn.student_module.backbone
    dim, depth, patch = backbone.embed_dim, len(backbone.blocks), backbone.patch_embed.patch_size[0]
    seconds = statistics.median(times[warmup:])
    return {
        "step_seconds": seconds,
        "images_per_second": batch / seconds,
        "flops": step_flops(cfg, dim, depth, patch, batch),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["imagenet_vit_small", "imagenet_vit_base"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", choices=["both", "eager", "compile"], default="both")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for the dtype, for MFU")
    parser.add_argument("--tiny", action="store_true", help="a 1-block model at 32 px (tests, CPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's per worker)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = {"both": [False, True], "eager": [False], "compile": [True]}[args.compile]
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]  # bf16 autocast is CUDA-only here
    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_step on {name}, torch {torch.__version__}; median of {args.steps} steps after {args.warmup}")
    for preset in args.preset:
        for compiled in modes:
            for precision in precisions:
                overrides = [*(TINY if args.tiny else []), f"optim.compile={str(compiled).lower()}",
                             f"optim.amp={str(precision == 'bf16').lower()}", "optim.freeze_last_layer_epochs=0"]
                if args.batch:
                    overrides.append(f"data.batch_size_per_worker={args.batch}")
                cfg = load_config(preset=preset, overrides=overrides)
                result = run(cfg, device, args.steps, args.warmup)
                tflops = result["flops"] / result["step_seconds"] / 1e12
                mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a (--peak-tflops)"
                row = {"preset": preset, "compile": compiled, "precision": precision, **result, "tflops": tflops}
                rows.append(row)
                print(f"  {preset:20s} {'compile' if compiled else 'eager  '} {precision}  batch "
                      f"{cfg.data.batch_size_per_worker}  {result['images_per_second']:8.1f} images/s  "
                      f"{result['step_seconds'] * 1000:8.1f} ms/step  {result['flops'] / 1e12:7.3f} TFLOP/step  "
                      f"{tflops:7.2f} TFLOP/s  MFU {mfu}  peak {result['peak_memory_gib']:.1f} GiB", flush=True)
    return rows


if __name__ == "__main__":
    main()
