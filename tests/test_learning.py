"""DINO-vMF learns: a short run of the demo's recipe must end with informative teacher targets and a
teacher whose kNN beats the same network at random initialisation. A change that breaks learning
fails it: a teacher that copies the student instead of averaging it, or centering switched off, ends
with uninformative targets and no kNN gain. A vMF correction with its sign flipped still learns at
this scale (the prototypes' precisions kappa = ||w|| / tau stay near 10-27, well below p = 64, where
log C_p(kappa) is nearly flat), so the run's targets are also checked against DINO-vMF's re-derived
independently with scipy on the trained network: that is what fails then.

One process, the shared ``DINOStep`` and the crop actors' batched multi-crop (``benchmarks/recipe_screen.py``),
seeded: the same figures on every run of the same machine. Targets are judged over the last tenth of
the run, as shares of log K: the mean entropy of a target, and the entropy of the batch-mean target,
which exceeds it only when targets differ from sample to sample (docs/objective.md, section 7).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special

from raydino.models import normalize_crops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import recipe_screen

LEARNING_RUN = ["optim.epochs=25"]  # 1,050 steps of the cpu_demo recipe on the embedded digits


def assert_learns(result: dict) -> None:
    entropy, mean_target = result["final_entropy_over_log_k"], result["final_mean_target_over_log_k"]
    assert entropy <= 0.75, f"targets nearly uniform: {result}"
    assert mean_target - entropy >= 0.2, f"targets say little about the sample: {result}"
    assert result["knn"] >= result["knn_random_init"] + 8.0, f"kNN no better than the random network: {result}"
    assert result["in_use"] >= 20, f"a handful of prototypes takes every image: {result}"


def independent_teacher_targets(scores: np.ndarray, norms: np.ndarray, tau: float, p: int, center: np.ndarray):
    """DINO-vMF's centred teacher targets re-derived in float64 with scipy: the posterior of a vMF mixture
    with precisions kappa_k = ||w_k|| / tau, log C_p(kappa) = (p/2 - 1) log kappa - (p/2) log 2 pi
    - log I_{p/2-1}(kappa), divided by the running usage c (probability centering) and renormalised."""
    kappa = norms / tau
    nu = p / 2 - 1
    log_c = nu * np.log(kappa) - (p / 2) * np.log(2 * np.pi) - (np.log(special.ive(nu, kappa)) + kappa)
    logits = scores / tau + log_c - np.log(center)
    return special.softmax(logits, axis=1)


def assert_targets_are_dino_vmfs(trained: dict) -> None:
    """The run trained DINO-vMF: on held-out digits, the targets its objective gives equal the vMF
    mixture's centred posterior computed independently from the trained teacher's prototypes."""
    step, cfg = trained["step"], trained["cfg"]
    x = normalize_crops([torch.from_numpy(trained["test"].images[:64])], "cpu")[0]
    with torch.no_grad():
        out = step.teacher([x])
        targets = step.objective.terms["cls"].teacher(out.scores[0], cfg.loss.teacher_temp, out.norms)
    center = step.objective.terms["cls"].teacher.centering.center.double().numpy()
    expected = independent_teacher_targets(out.scores[0].double().numpy(), out.norms.double().numpy(),
                                           cfg.loss.teacher_temp, cfg.head.bottleneck_dim, center)
    np.testing.assert_allclose(targets.double().numpy(), expected, rtol=1e-3, atol=1e-6,
                               err_msg="the run's teacher targets are not DINO-vMF's")


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 2 minutes alone on 2 cores
def test_the_demo_recipe_learns():
    trained: dict = {}
    assert_learns(recipe_screen.screen("learning", LEARNING_RUN, threads=2, keep=trained))
    assert_targets_are_dino_vmfs(trained)
