"""The recipe screen behind README's "What was tried" table reports what it claims, on a real tiny run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import pytest
import recipe_screen

from tests.tiny import TINY_RUN


@pytest.mark.slow
def test_a_screen_made_to_collapse_reports_uniform_targets():
    """Teacher at temperature 1 with logit centering: targets uniform, so entropy / log K is about 1 and
    the batch-mean target's entropy equals it; a sharp teacher (0.04) stays clearly below. The raw-pixel
    kNN is the same whatever the network."""
    base = [*TINY_RUN, "optim.epochs=2", "data.batch_size_per_worker=64", "loss.koleo_weight=0"]
    flat = recipe_screen.screen("flat", [*base, "loss.vmf=false", "loss.teacher_temp=1.0",
                                         "loss.warmup_teacher_temp=1.0"], threads=2)
    assert flat["steps"] == 2 * (1347 // 128) and len(flat["entropy_over_log_k"]) >= 10  # per tenth of the run
    assert flat["final_entropy_over_log_k"] > 0.99 and flat["entropy_over_log_k"][-1] > 0.99
    assert flat["final_mean_target_over_log_k"] > 0.99 and math.isclose(flat["log_k"], math.log(64), abs_tol=1e-3)
    kept: dict = {}
    sharp = recipe_screen.screen("sharp", base, threads=2, keep=kept)
    assert sharp["entropy_over_log_k"][0] < 0.9
    assert 0 <= sharp["knn_random_init"] <= 100 and 1 <= sharp["in_use"] <= 64
    assert len(sharp["kappa_student_q05_q50_q95"]) == 3 and sharp["knn_raw_pixels"] == flat["knn_raw_pixels"] > 90
    assert kept["step"].cfg.head.num_prototypes == 64 and len(kept["test"]) == 450
