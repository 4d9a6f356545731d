"""DINO-vMF learns: a short run of the demo's recipe must end with informative teacher targets and a
teacher whose kNN beats the same network at random initialisation. A change that breaks learning
fails it: planted here, a teacher that copies the student instead of averaging it, centering switched
off and the vMF correction's sign flipped each fail (README, "What the demo shows").

One process, the shared ``DINOStep`` and the crop actors' batched multi-crop (``benchmarks/recipe_screen.py``),
seeded: the same figures on every run of the same machine. Targets are judged over the last tenth of
the run, as shares of log K: the mean entropy of a target, and the entropy of the batch-mean target,
which exceeds it only when targets differ from sample to sample (docs/objective.md, section 7).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import recipe_screen

LEARNING_RUN = ["optim.epochs=30"]  # 1,260 steps of the cpu_demo recipe on the embedded digits


def assert_learns(result: dict) -> None:
    entropy, mean_target = result["final_entropy_over_log_k"], result["final_mean_target_over_log_k"]
    assert entropy <= 0.75, f"targets nearly uniform: {result}"
    assert mean_target - entropy >= 0.2, f"targets say little about the sample: {result}"
    assert result["knn"] >= result["knn_random_init"] + 8.0, f"kNN no better than the random network: {result}"
    assert result["in_use"] >= 20, f"a handful of prototypes takes every image: {result}"


@pytest.mark.slow
def test_the_demo_recipe_learns():
    assert_learns(recipe_screen.screen("learning", LEARNING_RUN, threads=2))
