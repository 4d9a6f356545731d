"""Collapse is detected while a run trains: the watch's rules (a real run made to collapse:
tests/test_pretrain_e2e.py::test_a_run_made_to_collapse_warns_once_and_is_tagged)."""

from __future__ import annotations

import math

import pytest

from raydino.eval.collapse import CollapseWatch

LOG_K = math.log(64)


def _epoch(watch: CollapseWatch, epoch: int, entropy: float, mean_target: float, in_use: float | None = None):
    for _ in range(5):
        watch.record(entropy, mean_target)
    return watch.end_epoch(epoch, in_use)


def test_uniform_targets_over_an_epoch_are_collapse_after_the_grace_epoch():
    watch = CollapseWatch(64)
    assert _epoch(watch, 0, LOG_K, LOG_K) is None  # a fresh head: not judged
    reason = _epoch(watch, 1, 0.99 * LOG_K, LOG_K)
    assert reason is not None and "uniform over epoch 2" in reason and "99.0% of log K" in reason
    assert _epoch(watch, 2, 0.9 * LOG_K, LOG_K) is None  # sharp enough, spread over prototypes: healthy
    # the threshold is the epoch's mean, not a single step
    for value in (LOG_K, LOG_K, 0.5 * LOG_K):
        watch.record(value, LOG_K)
    assert watch.end_epoch(3) is None


def test_the_epoch_means_are_kept_as_metrics_in_nats_and_shares_of_log_k():
    watch = CollapseWatch(64)
    for h, hm in ((1.0, 3.0), (2.0, 4.0)):
        watch.record(h, hm)
    watch.end_epoch(0)
    assert watch.epoch_means == pytest.approx({
        "epoch_teacher_entropy": 1.5, "epoch_mean_target_entropy": 3.5,
        "epoch_teacher_entropy_share": 1.5 / LOG_K, "epoch_mean_target_entropy_share": 3.5 / LOG_K})
    watch.end_epoch(1)  # nothing recorded: no means
    assert watch.epoch_means == {}


def test_one_prototype_for_everyone_and_a_handful_in_use_are_collapse():
    watch = CollapseWatch(64, grace_epochs=0)
    assert "one prototype took every sample" in _epoch(watch, 0, 0.01, 0.02)
    assert "used 2 of 64 prototypes" in _epoch(watch, 1, 0.5 * LOG_K, 3.0, in_use=2)
    assert _epoch(watch, 2, 0.5 * LOG_K, 3.0, in_use=40) is None
    assert watch.end_epoch(3) is None  # no steps recorded (all skipped): nothing to judge
    watch.record(math.nan, math.nan)
    assert watch.end_epoch(4) is None
