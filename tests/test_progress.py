"""In-epoch progress figures (raydino/train/progress.py) against a hand count on a fake clock."""

import pytest

from raydino.train.progress import ProgressMeter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(meter: ProgressMeter, clock: FakeClock, steps: int, wait: float, compute: float) -> None:
    for _ in range(steps):
        clock.now += wait + compute
        meter.record(wait, compute)


def test_figures_and_etas_from_a_hand_count():
    clock = FakeClock()
    meter = ProgressMeter(global_batch=64, steps_per_epoch=100, total_steps=1000, every_seconds=30.0, clock=clock)
    _run(meter, clock, 10, wait=0.5, compute=1.5)  # 10 steps of 2 s: 20 s, not due yet
    assert not meter.due()
    _run(meter, clock, 5, wait=0.5, compute=1.5)  # 30 s
    assert meter.due()
    figures, line, warning = meter.report(step=215, epoch=2, batch_in_epoch=15)
    assert figures["images_per_second"] == pytest.approx(15 * 64 / 30.0)
    assert figures["step_seconds"] == pytest.approx(2.0)
    assert figures["data_wait_fraction"] == pytest.approx(0.25)
    assert "epoch 3 step 15/100 (215/1000 in all)" in line and "32.0 images/s" in line and "data wait 25%" in line
    # 0.5 steps/s: 85 steps left in the epoch = 170 s, 785 in the run = 1570 s
    assert "epoch ends in 2m50s, run in 26m10s" in line
    assert warning is None  # the first window (start-up) does not warn
    assert not meter.due()  # a new window started
    _run(meter, clock, 15, wait=0.5, compute=1.5)
    warning = meter.report(step=230, epoch=2, batch_in_epoch=30)[2]
    assert warning is not None and "data.num_crop_actors" in warning and "data.cpus_per_crop_actor" in warning


def test_the_slow_data_warning_comes_once_and_only_above_the_threshold():
    clock = FakeClock()
    meter = ProgressMeter(global_batch=8, steps_per_epoch=50, total_steps=100, every_seconds=10.0, clock=clock)
    _run(meter, clock, 10, wait=0.9, compute=0.1)  # the first window is start-up: never a warning
    assert meter.report(10, 0, 10)[2] is None
    _run(meter, clock, 10, wait=0.1, compute=0.9)  # 10% wait: no warning
    assert meter.report(10, 0, 10)[2] is None
    _run(meter, clock, 10, wait=0.5, compute=0.5)  # 50%: warned
    assert meter.report(20, 0, 20)[2] is not None
    _run(meter, clock, 10, wait=0.5, compute=0.5)  # still slow: said once per run
    assert meter.report(30, 0, 30)[2] is None
