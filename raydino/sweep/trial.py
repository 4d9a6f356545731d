"""One trial: the Tune function trainable that runs a whole tracked pretraining.

The Ray 2.60 pattern (docs/architecture.md): the trainable builds and fits a ``TorchTrainer``
whose Train run is named after the trial id (so a retried trial resumes from its own
checkpoint) and whose ``TuneReportCallback`` forwards the per-epoch reports (``knn_top1``,
``epoch`` ...) to Tune, where ASHA can stop it early.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from raydino.config import Config, with_overrides
from raydino.pretrain import pretrain
from raydino.sweep.spec import arm_label, arm_values
from raydino.tracking import RunLogger, find_run, search_runs, source_tags
from raydino.train.driver import quiet_ray_data
from raydino.train.rung_report import RungReport

FINAL_KEY = "raydino_final"  # present only in a trial's last report, after its final evaluation


def trial_run_name(sweep: str, trial_id: str) -> str:
    """The trial's MLflow run name, which is how the driver finds the run again."""
    return f"{sweep}-{trial_id}"


def finished_run(uri: str, experiment: str, run_name: str, parent_run_id: str) -> dict[str, Any] | None:
    """The latest metrics of the trial's child run (and ``mlflow_run_id``) if it already ended FINISHED.

    A resumed sweep restarts every trial that Tune's last experiment snapshot (taken every 10 s or
    more) saw unfinished, including one that finished between that snapshot and the driver's death.
    ``pretrain`` ends a run FINISHED only after its final evaluation, so such a trial reports the run
    instead of reopening it and training again."""
    run_id = find_run(uri, experiment, run_name)
    if run_id is None or RunLogger(uri, run_id).status() != "FINISHED":
        return None
    row = next((r for r in search_runs(uri, experiment, parent_run_id) if r["run_id"] == run_id), None)
    if row is None:  # a run of that name outside this sweep: not ours to report
        return None
    return {**{k.removeprefix("metrics."): v for k, v in row.items() if k.startswith("metrics.")}, "mlflow_run_id": run_id}


def trial_tags(cfg: Config, setup: dict[str, Any], trial_id: str) -> dict[str, str]:
    """The child run's tags: sweep, trial, the arm as one label and one ``raydino.arm.<key>`` tag per
    arm key (columns the MLflow runs table can show and group by), and the sweep script as Source."""
    arm = arm_values(cfg, setup["arm_keys"])
    return {
        "raydino.sweep": setup["name"],
        "raydino.trial_id": trial_id,
        "raydino.arm": arm_label(arm),
        **{f"raydino.arm.{k}": v for k, v in arm.items()},
        **source_tags(setup.get("source_name")),  # the sweep's script, not this Ray worker's
    }


def run_trial(config: dict[str, Any], *, setup: dict[str, Any]) -> None:
    """The Tune function trainable: one pretraining run (train, evaluate, export, track)."""
    overrides: dict[str, Any] = config["overrides"]
    quiet_ray_data()
    base = Config.model_validate(setup["base"])
    trial_id = tune.get_context().get_trial_id()
    run_name = trial_run_name(setup["name"], trial_id)
    cfg = with_overrides(base, {
        **overrides,
        "tracking.run_name": run_name,
        "tracking.uri": setup["uri"],
        "checkpoint.storage_path": setup["train_storage"],
        "checkpoint.max_failures": setup["worker_failures"],
    })
    done = finished_run(setup["uri"], cfg.tracking.experiment, run_name, setup["parent_run_id"])
    if done is not None:
        print(f"[{trial_id}] MLflow run {done['mlflow_run_id']} had finished before the sweep was resumed: "
              "reporting it, not training it again", flush=True)
        knn = done.get("final_knn_top1", done.get("knn_top1", float("nan")))
        tune.report({**done, "knn_top1": knn, "epoch": cfg.optim.epochs, FINAL_KEY: 1})
        return
    summary = pretrain(
        cfg,
        parent_run_id=setup["parent_run_id"],
        tags=trial_tags(cfg, setup, trial_id),
        run_callbacks=[RungReport(cfg.optim.epochs)],
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
