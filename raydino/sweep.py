"""Sweeps on Ray Tune: one TorchTrainer per trial, every trial a nested MLflow run.

The Ray 2.60 pattern (architecture.md): a Tune *function* trainable builds and fits a
``TorchTrainer`` whose Train run is named after the trial id (so a retried trial resumes
from its own checkpoint) and whose ``TuneReportCallback`` forwards the per-epoch reports
(``knn_top1``, ``epoch`` ...) to Tune, where ASHA can stop it early.

MLflow: the driver creates the experiment and the parent run before any trial starts
(concurrent creation races in sqlite); each trial creates its child run; a Tune callback
on the driver ends child runs that their trial could not end itself (stopped by ASHA:
KILLED; crashed: FAILED), so no run is left RUNNING.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.sample import Domain

from raydino.config import Config, ConfigError, with_overrides
from raydino.pretrain import pretrain
from raydino.tracking import RunLogger, check_tracking, create_run, find_run, resolve_tracking_uri, search_runs
from raydino.train.driver import DEFAULT_STORAGE, check_data_path, ensure_ray, quiet_ray_data, required_cpus

FINAL_KEY = "raydino_final"  # present only in a trial's last report, after its final evaluation


@dataclass
class Asha:
    """ASHA early stopping on a per-epoch metric; rungs at grace_period * reduction_factor^i epochs."""

    metric: str = "knn_top1"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepSpec:
    """A sweep: a base config and a search space of dotted overrides.

    ``space`` maps a config key to a list (grid search: every value), a Tune domain
    (``tune.uniform``, ``tune.loguniform``, ``tune.choice`` ...: sampled ``num_samples``
    times) or a single value. ``arm_keys`` name the keys that identify an arm of the
    comparison (default: every grid key except ``seed``); they become MLflow tags.
    """

    name: str
    base: Config
    space: dict[str, Any]
    num_samples: int = 1
    arm_keys: list[str] | None = None
    asha: Asha | None = None
    trial_retries: int = 1
    worker_failures: int = 0
    max_concurrent_trials: int | None = None
    trial_cpus: float = 1.0
    storage_path: str | os.PathLike[str] | None = None

    def grid_keys(self) -> list[str]:
        return [k for k, v in self.space.items() if isinstance(v, list)]

    def arms(self) -> list[str]:
        return self.arm_keys if self.arm_keys is not None else [k for k in self.grid_keys() if k != "seed"]


@dataclass
class TrialOutcome:
    trial_id: str
    overrides: dict[str, Any]
    status: str  # FINISHED, KILLED (stopped early), FAILED
    attempts: int
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[TrialOutcome]
    max_concurrent_trials: int
    seconds: float

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)


def parse_space(items: Sequence[str]) -> dict[str, Any]:
    """``key=[a, b]`` (grid), ``key=uniform(a, b)``, ``key=loguniform(a, b)``, ``key=choice([a, b])``,
    ``key=value`` (fixed), with YAML values: a search space written as text (scripts, config files)."""
    import yaml

    space: dict[str, Any] = {}
    samplers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": tune.choice, "randint": tune.randint}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"search space entry {item!r} is not of the form key=[v1, v2] or key=uniform(a, b)")
        raw = raw.strip()
        fn = raw.split("(", 1)[0]
        if fn in samplers and raw.endswith(")"):
            args = _numbers(yaml.safe_load("[" + raw[len(fn) + 1 : -1] + "]"))
            space[key.strip()] = samplers[fn](*args)
        else:
            space[key.strip()] = _numbers(yaml.safe_load(raw))
    return space


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a search space means the number."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _grid_points(space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every grid combination, with one sample of each random domain (for validation)."""
    grid = {k: v for k, v in space.items() if isinstance(v, list)}
    fixed = {k: (v.sample() if isinstance(v, Domain) else v) for k, v in space.items() if k not in grid}
    return [{**fixed, **dict(zip(grid, combo))} for combo in itertools.product(*grid.values())]


def validate_space(spec: SweepSpec) -> list[Config]:
    """Build the config of every grid point now, so a bad key or value fails before any trial."""
    if not spec.space:
        raise ConfigError("the search space is empty; give at least one key, e.g. loss.vmf=[false, true]")
    empty = [k for k, v in spec.space.items() if isinstance(v, list) and not v]
    if empty:
        raise ConfigError(f"search space key(s) {', '.join(empty)} have an empty list of values")
    if spec.trial_retries < 0 or spec.num_samples < 1 or (spec.max_concurrent_trials or 1) < 1:
        raise ConfigError("trial_retries must be >= 0, num_samples and max_concurrent_trials >= 1")
    configs = []
    for point in _grid_points(spec.space):
        try:
            configs.append(with_overrides(spec.base, point))
        except ConfigError as exc:
            raise ConfigError(f"search space point {point} is invalid: {exc}") from None
    if spec.asha is not None:
        if any(c.eval.every_epochs != 1 for c in configs):
            raise ConfigError("ASHA needs a kNN evaluation every epoch: set eval.every_epochs=1")
        if not all(has_eval_data(c) for c in configs):
            raise ConfigError(
                "ASHA compares trials on kNN top-1, which needs labelled evaluation data: set eval.train_path "
                "and eval.test_path (labelled ImageFolders), or use data.source=digits / fashion_mnist"
            )
        if spec.asha.metric.startswith(("final_", "random_init_")):
            raise ConfigError(f"ASHA metric {spec.asha.metric!r} exists only after the last epoch; use a per-epoch "
                              "metric such as knn_top1")
    unknown = [k for k in spec.arms() if k not in spec.space]
    if unknown:
        raise ConfigError(f"arm key(s) {', '.join(unknown)} are not in the search space ({', '.join(spec.space)})")
    return configs


def has_eval_data(cfg: Config) -> bool:
    """Whether a run of ``cfg`` evaluates kNN every epoch (mirrors ``load_eval_data``)."""
    return cfg.data.source in ("digits", "fashion_mnist") or bool(cfg.eval.train_path and cfg.eval.test_path)


def absolute_paths(cfg: Config) -> Config:
    """Tune runs each trial in its own working directory: resolve relative paths on the driver."""
    updates: dict[str, Any] = {}
    for key, value in (("data.path", cfg.data.path), ("eval.train_path", cfg.eval.train_path),
                       ("eval.test_path", cfg.eval.test_path), ("checkpoint.storage_path", cfg.checkpoint.storage_path)):
        if value and "://" not in str(value):
            updates[key] = str(Path(str(value)).expanduser().resolve())
    return with_overrides(cfg, updates) if updates else cfg


def trial_resources(cfg: Config, trial_cpus: float) -> dict[str, float]:
    """What one trial needs in all: its Tune driver (which also runs the final evaluation)
    plus what its TorchTrainer requests (Train workers, Ray Data crop actors and readers)."""
    return {"CPU": required_cpus(cfg) + trial_cpus, "GPU": float(cfg.scaling.num_workers if cfg.scaling.use_gpu else 0)}


def derive_max_concurrent(configs: Sequence[Config], trial_cpus: float, cluster: Mapping[str, float]) -> int:
    """How many of the largest trial fit the cluster at once (at least one)."""
    need_cpu = max(trial_resources(c, trial_cpus)["CPU"] for c in configs)
    need_gpu = max(trial_resources(c, trial_cpus)["GPU"] for c in configs)
    if need_gpu > cluster.get("GPU", 0):
        raise ConfigError(
            f"one trial needs {need_gpu:g} GPU(s) (scaling.num_workers with scaling.use_gpu=true) but the Ray "
            f"cluster has {cluster.get('GPU', 0):g}; lower scaling.num_workers or add GPU nodes"
        )
    fits = math.floor(cluster.get("CPU", 0) / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / need_gpu + 1e-9))
    return max(1, fits)


def config_value(cfg: Config, dotted: str) -> Any:
    """The validated value of a dotted key (``model.kwargs.depth`` reaches into kwargs)."""
    node: Any = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def arm_values(cfg: Config, arm_keys: Sequence[str]) -> dict[str, str]:
    """An arm as strings, as the tags ``raydino.arm.<key>`` hold them (what the report groups by)."""
    return {k: str(config_value(cfg, k)) for k in arm_keys}


def arm_label(values: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all"


def _trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def _run_trial(config: dict[str, Any], *, setup: dict[str, Any]) -> None:
    """The Tune function trainable: one pretraining run (train, evaluate, export, track)."""
    overrides: dict[str, Any] = config["overrides"]
    quiet_ray_data()
    base = Config.model_validate(setup["base"])
    trial_id = tune.get_context().get_trial_id()
    run_name = _trial_run_name(setup["name"], trial_id)
    cfg = with_overrides(base, {**overrides, "tracking.run_name": run_name, "tracking.uri": setup["uri"]})
    arm = arm_values(cfg, setup["arm_keys"])
    tags = {
        "raydino.sweep": setup["name"],
        "raydino.trial_id": trial_id,
        "raydino.arm": arm_label(arm),
        **{f"raydino.arm.{k}": v for k, v in arm.items()},
    }
    summary = pretrain(
        cfg,
        storage_path=setup["train_storage"],
        max_failures=setup["worker_failures"],
        parent_run_id=setup["parent_run_id"],
        tags=tags,
        run_callbacks=[_RungReport(cfg.optim.epochs)],
        log=lambda line: print(f"[{trial_id}] {line}", flush=True),
    )
    final = {f"final_{k}": v for k, v in summary.final.metrics.items()}
    final.update({f"random_init_{k}": v for k, v in summary.final.random_init.items()})
    last = summary.result.metrics
    tune.report(
        {
            **{k: v for k, v in last.items() if isinstance(v, (int, float))},
            **final,
            "knn_top1": summary.final.metrics.get("knn_top1", last.get("knn_top1", float("nan"))),
            "epoch": cfg.optim.epochs,
            "mlflow_run_id": summary.mlflow_run_id,
            FINAL_KEY: 1,
        }
    )


RUNG_EPOCH = "rung_epoch"  # ASHA's time attribute: completed epochs, absent from the last epoch's reports


class _RungReport(TuneReportCallback):
    """Forwards Train reports to Tune and adds ``rung_epoch`` before the last epoch only, so
    ASHA never stops a trial that has finished training and is about to be evaluated."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and metrics[0].get("epoch", self.epochs) < self.epochs:
            metrics = [{**metrics[0], RUNG_EPOCH: metrics[0]["epoch"]}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


class _TrialBookkeeping(tune.Callback):
    """On the driver: ends each trial's MLflow run with the status its trial could not set
    itself, and records every outcome (retries included) for the sweep's report."""

    def __init__(self, uri: str, experiment: str, sweep: str, log: Callable[[str], None]) -> None:
        self.uri, self.experiment, self.sweep, self.log = uri, experiment, sweep, log
        self.outcomes: dict[str, TrialOutcome] = {}
        self.started: set[str] = set()

    def _end_run(self, trial_id: str, status: str) -> None:
        try:
            run_id = find_run(self.uri, self.experiment, _trial_run_name(self.sweep, trial_id))
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

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started.add(trial.trial_id)

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
        error = trial.get_error()  # the formatted traceback text
        message = _last_lines(str(error)) if error else "unknown error (see the trial's log)"
        self._record(trial, "FAILED", message)
        self.log(f"sweep: trial {trial.trial_id} FAILED after {trial.num_failures} attempt(s): {_last_lines(message, 1)}")


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])[-1500:]


def run_sweep(
    spec: SweepSpec,
    log: Callable[[str], None] = print,
    report: Callable[[SweepResult], Sequence[Path]] | None = None,
) -> SweepResult:
    """Validate, create the parent run, run every trial on Tune, end every run; return outcomes.

    Trial failures do not raise: they are retried ``spec.trial_retries`` times, then reported
    in the result (status FAILED with the error) while the other trials go on. ``report``
    (e.g. the ablation table and plots) runs before the parent run ends; the files it
    returns become the parent's artifacts.
    """
    started = time.perf_counter()
    spec = dataclasses.replace(spec, base=absolute_paths(spec.base))
    configs = validate_space(spec)
    for cfg in configs:
        check_data_path(cfg)
    uri = resolve_tracking_uri(spec.base.tracking.uri)
    check_tracking(uri)
    experiment = spec.base.tracking.experiment
    storage = Path(spec.storage_path or spec.base.checkpoint.storage_path or DEFAULT_STORAGE).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)

    largest = max(configs, key=lambda c: trial_resources(c, spec.trial_cpus)["CPU"])
    # a Ray started here (no cluster to join) is sized for the requested number of trials at once
    per_trial = trial_resources(largest, spec.trial_cpus)["CPU"]
    ensure_ray(largest, extra_cpus=spec.trial_cpus + per_trial * ((spec.max_concurrent_trials or 1) - 1))
    concurrency = spec.max_concurrent_trials or derive_max_concurrent(configs, spec.trial_cpus, ray.cluster_resources())

    parent_params = {
        **spec.base.flat(),
        "sweep.space": json.dumps({k: _describe(v) for k, v in spec.space.items()}),
        "sweep.num_samples": spec.num_samples,
        "sweep.asha": json.dumps(spec.asha.__dict__) if spec.asha else "off",
        "sweep.trial_retries": spec.trial_retries,
        "sweep.max_concurrent_trials": concurrency,
    }
    for key in spec.space:  # the parent shows the swept keys as swept, not as the base value
        parent_params[key] = _describe(spec.space[key])
    parent_run_id = create_run(uri, experiment, spec.name, parent_params, {"raydino.sweep": spec.name, "raydino.role": "parent"})
    parent = RunLogger(uri, parent_run_id)
    log(
        f"sweep {spec.name!r}: {len(configs) * spec.num_samples} trial(s), up to {concurrency} at a time; "
        f"MLflow parent run {parent_run_id} in {uri}"
    )

    bookkeeping = _TrialBookkeeping(uri, experiment, spec.name, log)
    setup = {
        "name": spec.name,
        "base": spec.base.model_dump(mode="json"),
        "uri": uri,
        "parent_run_id": parent_run_id,
        "arm_keys": spec.arms(),
        "train_storage": str(storage / spec.name / "train"),
        "worker_failures": spec.worker_failures,
    }
    trainable = tune.with_resources(tune.with_parameters(_run_trial, setup=setup), {"CPU": spec.trial_cpus})
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
    tuner = tune.Tuner(
        trainable,
        param_space={"overrides": {k: tune.grid_search(v) if isinstance(v, list) else v for k, v in spec.space.items()}},
        tune_config=tune.TuneConfig(
            num_samples=spec.num_samples,
            scheduler=scheduler,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=spec.trial_retries),
            callbacks=[bookkeeping],
            verbose=0,
        ),
    )
    expected = len(configs) * spec.num_samples
    try:
        tuner.fit()
    except BaseException:
        _close_children(uri, experiment, parent_run_id, log)
        parent.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    # Tune handles Ctrl-C itself and returns: trials it stopped got no callback, so close what is open
    interrupted = _close_children(uri, experiment, parent_run_id, log) or len(bookkeeping.outcomes) < expected
    trials = sorted(bookkeeping.outcomes.values(), key=lambda t: t.trial_id)
    result = SweepResult(spec.name, uri, experiment, parent_run_id, trials, concurrency, time.perf_counter() - started)
    counts = {"trials_finished": "FINISHED", "trials_stopped": "KILLED", "trials_failed": "FAILED"}
    parent.log_metrics({key: result.count(status) for key, status in counts.items()}, 0)
    failed = ",".join(t.trial_id for t in trials if t.status == "FAILED")
    parent.set_tags({"raydino.failed_trials": failed or "none", "raydino.trials_expected": str(expected)})
    if interrupted:
        log(f"sweep: interrupted with {len(trials)} of {expected} trials done; the parent run ends KILLED")
    if report is not None:
        try:
            for path in report(result):
                parent.log_artifact(path, "sweep")
        except Exception as exc:  # noqa: BLE001 - the trials' outcome must still reach the user
            log(f"sweep: the report failed ({type(exc).__name__}: {exc}); trial outcomes follow")
            parent.set_tags({"raydino.report_error": str(exc)[:500]})
    parent.end("KILLED" if interrupted else "FINISHED")
    return result


def _close_children(uri: str, experiment: str, parent_run_id: str, log: Callable[[str], None]) -> bool:
    """End every child run still RUNNING (its trial was stopped without a callback) as KILLED;
    True if there was one."""
    open_runs = [r["run_id"] for r in search_runs(uri, experiment, parent_run_id) if r["status"] == "RUNNING"]
    for run_id in open_runs:
        RunLogger(uri, run_id).end("KILLED")
    if open_runs:
        log(f"sweep: {len(open_runs)} trial run(s) were still open and are now KILLED")
    return bool(open_runs)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "grid " + json.dumps(value)
    if isinstance(value, Domain):
        return repr(value)
    return json.dumps(value) if not isinstance(value, str) else value
