"""Collapse is detected while a run trains: the watch's rules, and a real run made to collapse."""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient

from raydino.config import load_config
from raydino.eval.collapse import CollapseWatch
from raydino.pretrain import pretrain, summary_lines
from tests.tiny import TINY_RUN

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


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_made_to_collapse_warns_once_and_is_tagged(ray_session, tmp_path, capfd):
    """A teacher at temperature 1 with DINO's logit centering: the targets are uniform from the start."""
    cfg = load_config(overrides=[
        *TINY_RUN, "data.batch_size_per_worker=16", "data.crop_batch_size=32", "eval.max_images=120",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"checkpoint.storage_path={tmp_path / 'runs'}",
        "tracking.run_name=collapse", "optim.epochs=3", "loss.vmf=false", "loss.teacher_temp=1.0",
        "loss.warmup_teacher_temp=1.0", "loss.koleo_weight=0", "tracking.log_every_steps=2",
    ])
    summary = pretrain(cfg, log=lambda _: None)
    out = capfd.readouterr().out
    warnings = [line for line in out.splitlines() if "raydino: warning: collapse:" in line]
    assert len(warnings) == 1, out[-3000:]
    assert "uniform over epoch 2" in warnings[0] and "loss.teacher_temp" in warnings[0]
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert "uniform over epoch 2" in run.data.tags["raydino.collapse"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(summary.mlflow_run_id, "collapsed"))
    assert [value for _, value in history] == [0.0, 1.0, 1.0]
    lines = summary_lines(summary)
    assert any(line.startswith("collapse: the last epoch was collapsed") for line in lines)
    assert any(line.startswith("prototype precision kappa, q05..q95: student ") for line in lines)
