import itertools
import math

import pytest

from raydino.config import load_config
from raydino.config.schedules import Schedules, cosine, linear_warmup, warmup_cosine

S = Schedules(
    epochs=10, lr=1e-3, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4,
    momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
    freeze_last_layer_epochs=1,
)
TOTAL = 1000


def test_endpoints():
    start, end = S.at(0, TOTAL), S.at(TOTAL, TOTAL)
    assert start.lr == 0.0 and end.lr == pytest.approx(1e-6)
    assert S.at(200, TOTAL).lr == pytest.approx(1e-3)  # end of warm-up
    assert start.weight_decay == pytest.approx(0.04) and end.weight_decay == pytest.approx(0.4)
    assert start.teacher_momentum == pytest.approx(0.996) and end.teacher_momentum == pytest.approx(1.0)
    assert start.teacher_temp == pytest.approx(0.04) and S.at(300, TOTAL).teacher_temp == pytest.approx(0.07)
    assert end.teacher_temp == pytest.approx(0.07)


def test_monotonicity():
    values = [S.at(s, TOTAL) for s in range(TOTAL + 1)]
    lrs = [v.lr for v in values]
    assert all(a <= b for a, b in itertools.pairwise(lrs[:201]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[200:]))
    for attr in ("weight_decay", "teacher_momentum", "teacher_temp"):
        seq = [getattr(v, attr) for v in values]
        assert all(a <= b for a, b in itertools.pairwise(seq)), attr


def test_last_layer_frozen_for_first_epoch():
    assert S.at(0, TOTAL).last_layer_lr == 0.0
    assert S.at(99, TOTAL).last_layer_lr == 0.0
    assert S.at(100, TOTAL).last_layer_lr == S.at(100, TOTAL).lr > 0


def test_step_purity_and_worker_count_independence():
    # the same progress gives the same values, whatever the order of calls
    forward = [S.at(s, TOTAL) for s in range(0, TOTAL + 1, 7)]
    backward = [S.at(s, TOTAL) for s in reversed(range(0, TOTAL + 1, 7))]
    assert forward == list(reversed(backward))
    # halving the steps (twice the workers, same per-worker batch) keeps each fraction of the run
    assert S.at(500, TOTAL) == S.at(250, TOTAL // 2)


def test_helpers():
    assert cosine(0, 10, 1.0, 0.0) == 1.0 and cosine(10, 10, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(5, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert linear_warmup(5, 10, 0.0, 1.0) == 0.5 and linear_warmup(15, 10, 0.0, 1.0) == 1.0
    assert linear_warmup(0, 0, 0.0, 1.0) == 1.0
    assert warmup_cosine(10, 10, 1.0, 0.1, 10) == 1.0
    assert math.isclose(warmup_cosine(5, 10, 1.0, 0.0, 0), 0.5, abs_tol=1e-12)


def test_bad_steps_are_rejected():
    with pytest.raises(ValueError, match="total_steps"):
        S.at(0, 0)
    with pytest.raises(ValueError, match="step must be"):
        S.at(11, 10)


def test_config_schedules_use_scaled_lr():
    cfg = load_config(overrides=["data.batch_size_per_worker=128", "scaling.num_workers=4", "optim.base_lr=5e-4"])
    assert cfg.schedules().lr == pytest.approx(5e-4 * 512 / 256)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2])
def test_per_step_schedules_equal_dinos_cosine_scheduler(warmup_epochs):
    from tests.reference_loops import cosine_scheduler

    epochs, niter = 10, 7
    s = Schedules(
        epochs=epochs, lr=1e-3, min_lr=1e-6, warmup_epochs=warmup_epochs, weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=0,
        freeze_last_layer_epochs=1,
    )
    total = epochs * niter
    lr = cosine_scheduler(1e-3, 1e-6, epochs, niter, warmup_epochs=warmup_epochs)
    wd = cosine_scheduler(0.04, 0.4, epochs, niter)
    momentum = cosine_scheduler(0.996, 1, epochs, niter)
    for step in range(total):
        values = s.at(step, total)
        assert values.lr == pytest.approx(lr[step], rel=1e-12, abs=1e-15)
        assert values.weight_decay == pytest.approx(wd[step], rel=1e-12)
        assert values.teacher_momentum == pytest.approx(momentum[step], rel=1e-12)
        assert values.last_layer_frozen == (step < niter)  # DINO: epoch < freeze_last_layer
