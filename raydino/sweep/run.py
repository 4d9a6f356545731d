"""``run_sweep``: one TorchTrainer per Tune trial, every trial a nested MLflow run.

The driver creates the experiment and the parent run before any trial starts (concurrent
creation races in sqlite); each trial creates its child run; the parent ends here, after
every child has ended. The report (table, plots) is the caller's: it reads MLflow, so it
can be written (and attached to the parent run) after the parent has ended.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.sample import Domain

from raydino.config import ConfigError
from raydino.launch.plan import check_data_path
from raydino.stores.run_storage import join_storage, ray_storage, resolve_storage
from raydino.sweep.bookkeeping import TrialBookkeeping, close_children, serving
from raydino.sweep.spec import (
    SweepResult,
    SweepSpec,
    absolute_paths,
    cluster_capacity,
    derive_max_concurrent,
    trial_resources,
    validate_space,
)
from raydino.sweep.trial import run_trial
from raydino.tracking import (
    RunLogger,
    TrackingError,
    check_tracking,
    create_run,
    resolve_tracking_uri,
    search_runs,
    source_name,
)
from raydino.train.driver import ensure_ray
from raydino.train.rung_report import RUNG_EPOCH


class SweepResumeError(ConfigError):
    """A sweep that cannot be resumed as asked; the message lists those that can."""


def run_sweep(spec: SweepSpec, log: Callable[[str], None] = print, resume: bool = False) -> SweepResult:
    """Validate, create the parent run, run every trial on Tune, end every run; return outcomes.

    ``resume``: continue the sweep ``spec.name`` whose driver died or was interrupted, with Tune's own
    restore: finished trials stay finished, the others continue from their checkpoints, the parent
    run is reopened and each trial continues its own child run. The spec must be the one it was
    started with (checked against the parent run's params: ``SweepResumeError`` names what differs).

    Trial failures do not raise: they are retried ``spec.trial_retries`` times, then reported
    in the result (status FAILED with the error) while the other trials go on. The parent run
    ends FINISHED, or KILLED if the sweep was interrupted (FAILED if Tune itself raised).
    """
    started = time.perf_counter()
    spec = dataclasses.replace(spec, base=absolute_paths(spec.base))
    configs = validate_space(spec)
    for cfg in configs:
        check_data_path(cfg)
    uri = resolve_tracking_uri(spec.base.tracking.uri)
    check_tracking(uri)
    experiment = spec.base.tracking.experiment
    storage = resolve_storage(spec.storage_path or spec.base.checkpoint.storage_path)
    tune_path, tune_filesystem = ray_storage(storage)  # a remote URI as a filesystem with its endpoint
    experiment_path = join_storage(tune_path, spec.name)
    resumed = _resumable_parent(spec, uri, storage) if resume else None

    largest = max(configs, key=lambda c: trial_resources(c, spec.trial_cpus)["CPU"])
    # a Ray started here (no cluster to join) is sized for the requested number of trials at once
    per_trial = trial_resources(largest, spec.trial_cpus)["CPU"]
    ensure_ray(largest, extra_cpus=spec.trial_cpus + per_trial * ((spec.max_concurrent_trials or 1) - 1))
    capacity = cluster_capacity(ray.cluster_resources())  # an autoscaling cluster counts the nodes it can add
    concurrency = spec.max_concurrent_trials or derive_max_concurrent(configs, spec.trial_cpus, capacity)

    if resumed is None:
        parent_run_id = create_run(uri, experiment, spec.name, _parent_params(spec, concurrency),
                                   {"raydino.sweep": spec.name, "raydino.role": "parent", "raydino.attempts": "1",
                                    "raydino.arm_keys": ", ".join(spec.arms()) or "none"})
        parent = RunLogger(uri, parent_run_id)
        how = "MLflow parent run"
    else:  # Tune keeps the concurrency it was started with
        parent_run_id, concurrency = resumed["run_id"], int(resumed["params.sweep.max_concurrent_trials"])
        parent = RunLogger(uri, parent_run_id)
        how = f"resumed (attempt {parent.reopen()}) in MLflow parent run"
    expected = len(configs) * spec.num_samples
    log(f"sweep {spec.name!r}: {expected} trial(s), up to {concurrency} at a time; {how} {parent_run_id} in {uri}")

    bookkeeping = TrialBookkeeping(uri, experiment, spec.name, log)
    setup = {
        "name": spec.name,
        "base": spec.base.model_dump(mode="json"),
        "uri": uri,
        "parent_run_id": parent_run_id,
        "arm_keys": spec.arms(),
        "source_name": source_name(),  # a trial runs in a Ray worker: its runs' Source is this driver's script
        "train_storage": join_storage(storage, spec.name, "train"),
        "worker_failures": spec.worker_failures,
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": spec.trial_cpus})
    scheduler = None
    if spec.asha is not None:
        scheduler = ASHAScheduler(
            time_attr=RUNG_EPOCH,  # never reaches optim.epochs, so max_t never stops a trial
            metric=spec.asha.metric,
            mode=spec.asha.mode,
            max_t=max(c.optim.epochs for c in configs),
            grace_period=spec.asha.grace_period,
            reduction_factor=spec.asha.reduction_factor,
        )
    overrides = {k: tune.grid_search(v) if isinstance(v, list) else v for k, v in spec.space.items()}
    try:
        with serving(bookkeeping):  # a restored Tuner's callback is this one (TrialBookkeeping.__reduce__)
            if resumed is None:
                tuner = tune.Tuner(
                    trainable,
                    param_space={"overrides": overrides},
                    tune_config=tune.TuneConfig(
                        num_samples=spec.num_samples,
                        scheduler=scheduler,
                        max_concurrent_trials=concurrency,
                        trial_dirname_creator=lambda trial: trial.trial_id,
                    ),
                    run_config=tune.RunConfig(
                        name=spec.name,
                        storage_path=tune_path,
                        storage_filesystem=tune_filesystem,
                        failure_config=tune.FailureConfig(max_failures=spec.trial_retries),
                        callbacks=[bookkeeping],
                        verbose=0,
                    ),
                )
            else:  # Tune's tuner.pkl holds the rest; unfinished trials continue, errored ones stay failed
                tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False,
                                           restart_errored=False, storage_filesystem=tune_filesystem)
            tuner.fit()
    except BaseException:
        close_children(uri, experiment, parent_run_id, log)
        parent.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    # Tune handles Ctrl-C itself and returns: trials it stopped got no callback, so close what is open
    interrupted = close_children(uri, experiment, parent_run_id, log) or len(bookkeeping.outcomes) < expected
    trials = sorted(bookkeeping.outcomes.values(), key=lambda t: t.trial_id)
    result = SweepResult(spec.name, uri, experiment, parent_run_id, trials, concurrency, time.perf_counter() - started)
    counts = {"trials_finished": "FINISHED", "trials_stopped": "KILLED", "trials_failed": "FAILED"}
    parent.log_metrics({key: result.count(status) for key, status in counts.items()}, 0)
    failed = ",".join(t.trial_id for t in trials if t.status == "FAILED")
    parent.set_tags({"raydino.failed_trials": failed or "none", "raydino.trials_expected": str(expected)})
    if interrupted:
        log(f"sweep: interrupted with {len(trials)} of {expected} trials done; the parent run ends KILLED")
    parent.end("KILLED" if interrupted else "FINISHED")
    return result


def _parent_rows(uri: str, experiment: str) -> list[dict[str, Any]]:
    """The sweeps' parent runs in ``experiment``, newest first (none if there is no such experiment)."""
    try:
        runs = search_runs(uri, experiment)
    except TrackingError:  # no experiment of that name: no sweep to resume
        return []
    parents = [r for r in runs if r.get("tags.raydino.role") == "parent" and r.get("tags.raydino.sweep")]
    return sorted(parents, key=lambda r: r["start_time"], reverse=True)


def resumable_sweeps(uri: str, experiment: str, storage: str) -> list[str]:
    """Names of the sweeps of ``experiment`` that can be resumed from ``storage``, newest first: their
    parent run has not ended FINISHED and Tune can restore their directory (``Tuner.can_restore``)."""
    path, filesystem = ray_storage(storage)
    names: list[str] = []
    for row in _parent_rows(uri, experiment):
        name = row["tags.raydino.sweep"]
        if row["status"] != "FINISHED" and name not in names and tune.Tuner.can_restore(
            join_storage(path, name), storage_filesystem=filesystem
        ):
            names.append(name)
    return names


def _resumable_parent(spec: SweepSpec, uri: str, storage: str) -> dict[str, Any]:
    """The parent run (a ``search_runs`` row) of the sweep ``spec`` resumes, once it is known that Tune can
    restore it and that ``spec`` has the settings the sweep was started with (the parent's params)."""
    experiment = spec.base.tracking.experiment
    available = resumable_sweeps(uri, experiment, storage)
    parent = next((r for r in _parent_rows(uri, experiment) if r["tags.raydino.sweep"] == spec.name), None)
    if spec.name not in available:
        why = ("no such sweep" if parent is None else "it finished" if parent["status"] == "FINISHED"
               else "Tune has no state of it there")
        raise SweepResumeError(
            f"cannot resume sweep {spec.name!r} from {storage} ({why}); sweeps of experiment {experiment!r} that "
            f"can be resumed there: {', '.join(available) or 'none'}"
        )
    assert parent is not None
    then = {k.removeprefix("params."): v for k, v in parent.items() if k.startswith("params.")}
    now = {k: str(v) for k, v in _parent_params(spec, int(then.get("sweep.max_concurrent_trials", 0))).items()}
    differ = [k for k in sorted({*then, *now}) if not _same_param(then.get(k), now.get(k))
              and not (k.startswith("sweep.") and k not in then)]  # a sweep.* setting its raydino did not record
    if differ:
        shown = "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in differ[:5])
        more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
        raise SweepResumeError(
            f"sweep {spec.name!r} was started with other settings ({shown}{more}); resume it with the "
            "arguments it was started with"
        )
    return parent


def _same_param(stored: str | None, value: str | None) -> bool:
    """``value`` is what MLflow holds as ``stored`` (which keeps only the start of a very long value)."""
    if stored is None or value is None:
        return stored == value
    return stored == value or (stored.endswith("...") and value.startswith(stored[:-3]))


def _parent_params(spec: SweepSpec, concurrency: int) -> dict[str, Any]:
    """The base config with the swept keys shown as swept (not as the base value), and the sweep's settings."""
    params: dict[str, Any] = {
        **spec.base.flat(),
        "sweep.space": json.dumps({k: _describe(v) for k, v in spec.space.items()}),
        "sweep.num_samples": spec.num_samples,
        "sweep.asha": json.dumps(spec.asha.__dict__) if spec.asha else "off",
        "sweep.trial_retries": spec.trial_retries,
        "sweep.max_concurrent_trials": concurrency,
        "sweep.arm_keys": json.dumps(spec.arms()),
        "sweep.worker_failures": spec.worker_failures,
        "sweep.trial_cpus": spec.trial_cpus,
    }
    params.update({key: _describe(value) for key, value in spec.space.items()})
    return params


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "grid " + json.dumps(value)
    if isinstance(value, Domain):
        return repr(value)
    return json.dumps(value) if not isinstance(value, str) else value
