"""On the driver: no trial's MLflow run is left RUNNING, and every outcome is recorded.

A trial stopped by ASHA or crashed cannot end its own run (its process is gone), so a
Tune callback ends it (KILLED or FAILED); runs of trials Tune stopped without a callback
(Ctrl-C) are closed after the fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from raydino.sweep.spec import TrialOutcome
from raydino.sweep.trial import FINAL_KEY, trial_run_name
from raydino.tracking import RunLogger, find_run, search_runs


class TrialBookkeeping(tune.Callback):
    """Ends each trial's MLflow run with the status its trial could not set itself, and
    records every outcome (retries included) for the sweep's result."""

    def __init__(self, uri: str, experiment: str, sweep: str, log: Callable[[str], None]) -> None:
        self.uri, self.experiment, self.sweep, self.log = uri, experiment, sweep, log
        self.outcomes: dict[str, TrialOutcome] = {}

    def __reduce__(self) -> tuple[Callable[..., TrialBookkeeping], tuple[str, str, str]]:
        """Tune pickles the RunConfig, this callback included, into the sweep's ``tuner.pkl``, and
        ``Tuner.restore`` unpickles it in the driver that resumes the sweep: pickled as the sweep's
        identity, it comes back as that driver's live instance (``serving``), so the outcomes land where
        ``run_sweep`` reads them and the log lines in its log."""
        return live_bookkeeping, (self.uri, self.experiment, self.sweep)

    def get_state(self) -> dict[str, Any]:
        """Saved by Tune with each experiment snapshot, beside the trials' statuses: a resumed sweep
        knows the outcomes (attempts, errors) of the trials that had ended when the snapshot was taken."""
        return {"outcomes": dict(self.outcomes)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.outcomes.update(state.get("outcomes", {}))

    def _end_run(self, trial_id: str, status: str) -> None:
        try:
            run_id = find_run(self.uri, self.experiment, trial_run_name(self.sweep, trial_id))
            if run_id is not None:
                RunLogger(self.uri, run_id).end_unless_finished(status)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not turn into a trial failure
            self.log(f"sweep: could not set MLflow status {status} for trial {trial_id}: {exc}")

    def _record(self, trial: Any, status: str, error: str | None = None) -> None:
        result = dict(trial.last_result or {})
        attempts = trial.num_failures if status == "FAILED" else trial.num_failures + 1
        self.outcomes[trial.trial_id] = TrialOutcome(
            trial.trial_id, dict(trial.config.get("overrides", {})), status, attempts, result, error
        )

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.log(f"sweep: trial {trial.trial_id} failed (attempt {trial.num_failures}); retrying it")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        finished = FINAL_KEY in (trial.last_result or {})
        if not finished:  # stopped by the scheduler: its process was ended before it could say so
            self._end_run(trial.trial_id, "KILLED")
        self._record(trial, "FINISHED" if finished else "KILLED")
        knn = (trial.last_result or {}).get("knn_top1", float("nan"))
        self.log(f"sweep: trial {trial.trial_id} {'finished' if finished else 'stopped early'}: kNN top-1 {knn:.1f}%")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end_run(trial.trial_id, "FAILED")
        error = latest_error(trial)
        message = _last_lines(error) if error else "unknown error (see the trial's log)"
        self._record(trial, "FAILED", message)
        self.log(
            f"sweep: trial {trial.trial_id} FAILED after {trial.num_failures} attempt(s): {_last_lines(message, 1)}"
        )


_SERVING: dict[str, TrialBookkeeping] = {}
"""The live callback of each sweep this driver is running, by sweep name."""


@contextmanager
def serving(bookkeeping: TrialBookkeeping) -> Iterator[TrialBookkeeping]:
    """While the sweep runs (restore included), a pickled callback of the same sweep unpickles as ``bookkeeping``."""
    _SERVING[bookkeeping.sweep] = bookkeeping
    try:
        yield bookkeeping
    finally:
        _SERVING.pop(bookkeeping.sweep, None)


def live_bookkeeping(uri: str, experiment: str, sweep: str) -> TrialBookkeeping:
    """The running driver's callback of ``sweep``; a fresh one (printing) outside ``serving``."""
    return _SERVING.get(sweep) or TrialBookkeeping(uri, experiment, sweep, print)


def close_children(uri: str, experiment: str, parent_run_id: str, log: Callable[[str], None]) -> bool:
    """End every child run still RUNNING (its trial was stopped without a callback) as KILLED;
    True if there was one."""
    open_runs = [r["run_id"] for r in search_runs(uri, experiment, parent_run_id) if r["status"] == "RUNNING"]
    for run_id in open_runs:
        RunLogger(uri, run_id).end("KILLED")
    if open_runs:
        log(f"sweep: {len(open_runs)} trial run(s) were still open and are now KILLED")
    return bool(open_runs)


def latest_error(trial: Any) -> str | None:
    """The text of the trial's errors, its latest last. Tune appends each failure to the trial's local error file
    at once and copies that file to the sweep's storage (where ``trial.get_error()`` reads) only at a later sync:
    read there, a trial that failed at its first attempt (no retry) had no text yet: "unknown error"."""
    path = trial.error_file
    if path and os.path.isfile(path):
        return Path(path).read_text(errors="replace")
    return trial.get_error()


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])[-1500:]
