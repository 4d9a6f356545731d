"""benchmarks/gpu_step.py runs (tiny model, CPU, 2 steps) and its analytic FLOP count agrees with
torch's own FlopCounterMode on the network it times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_step

from raydino.config import load_config
from raydino.step import build_models


@pytest.mark.parametrize("size", [32, 16])
def test_analytic_flops_match_torchs_counter(size):
    cfg = load_config(overrides=[*gpu_step.TINY, "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"])
    student, _ = build_models(cfg)
    for block in student.backbone.blocks:  # explicit q @ k^T and attn @ v: the counter misses CPU's fused SDPA
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        student([torch.randn(3, 3, size, size)])
    backbone = student.backbone
    expected = 3 * (gpu_step.vit_forward_flops(size, 8, backbone.embed_dim, len(backbone.blocks))
                    + gpu_step.head_flops(32, cfg.head.hidden_dim, cfg.head.bottleneck_dim, cfg.head.num_layers,
                                          cfg.head.num_prototypes))
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)


@pytest.mark.timeout(300)
def test_the_benchmark_runs_on_cpu(capsys):
    rows = gpu_step.main(["--tiny", "--steps", "2", "--warmup", "1", "--compile", "eager",
                          "--preset", "imagenet_vit_small", "--peak-tflops", "1"])
    assert len(rows) == 1 and rows[0]["images_per_second"] > 0 and rows[0]["flops"] > 0
    assert "MFU" in capsys.readouterr().out
