"""Sweeps on Ray Tune: a search space over a base config, one TorchTrainer per trial, every
trial a nested MLflow run under one parent run.

``spec`` says what a sweep is and checks it before Ray starts; ``trial`` is what runs in each
Tune trial; ``bookkeeping`` leaves no MLflow run RUNNING; ``run`` puts them together.
"""

from raydino.sweep.run import SweepResumeError, resumable_sweeps, run_sweep
from raydino.sweep.spec import (
    Asha,
    SweepResult,
    SweepSpec,
    TrialOutcome,
    absolute_paths,
    arm_label,
    arm_values,
    config_value,
    derive_max_concurrent,
    has_eval_data,
    trial_resources,
    validate_space,
)

__all__ = [
    "Asha",
    "SweepResult",
    "SweepResumeError",
    "SweepSpec",
    "TrialOutcome",
    "absolute_paths",
    "arm_label",
    "arm_values",
    "config_value",
    "derive_max_concurrent",
    "has_eval_data",
    "resumable_sweeps",
    "run_sweep",
    "trial_resources",
    "validate_space",
]
