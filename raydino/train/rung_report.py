"""The Train callback that forwards a sweep trial's reports to Tune, in a module that imports only Ray Tune.

Ray Train pickles a run's callbacks to its controller actor and to every train worker; unpickling a class
imports its module in those processes. Defined in ``raydino.sweep.trial``, it made each of them import all of
raydino's sweep, driver and evaluation code (4-4.5 s of imports in each, timed on a busy 2-core machine, 2026-12-06) for one small class.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

RUNG_EPOCH = "rung_epoch"  # ASHA's time attribute: completed epochs, absent from the last epoch's reports


class RungReport(TuneReportCallback):
    """Forwards Train reports to Tune and adds ``rung_epoch`` before the last epoch only, so
    ASHA never stops a trial that has finished training and is about to be evaluated."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and metrics[0].get("epoch", self.epochs) < self.epochs:
            metrics = [{**metrics[0], RUNG_EPOCH: metrics[0]["epoch"]}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)
