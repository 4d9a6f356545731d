"""``raydino pretrain``: one tracked run from config to evaluated, exported teacher.

Order matters for users: the tracking store and the data path are checked before Ray
starts; the MLflow run always ends with a final status, never left RUNNING.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydino.config import Config
from raydino.data.eval_data import load_eval_data
from raydino.eval.data import EvalData
from raydino.eval.evaluate import evaluate_network, evaluate_with_usage
from raydino.eval.plots import plot_kappa_histogram, plot_loss_curve, plot_prototype_usage
from raydino.eval.prototypes import kappa_statistics
from raydino.export import export_backbone, load_teacher
from raydino.models.param_groups import LAST_LAYER_PREFIX, PROTOTYPE_GAIN_SUFFIX
from raydino.plan import plan_run
from raydino.step import build_models
from raydino.tracking import (
    PROTOTYPE_ARRAYS,
    RunLogger,
    check_tracking,
    create_run,
    find_run,
    resolve_tracking_uri,
    ui_command,
)
from raydino.train.driver import TrainResult, run_pretraining


@dataclass
class FinalEvaluation:
    metrics: dict[str, float]
    random_init: dict[str, float]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def final_evaluation(
    checkpoint_dir: Path, cfg: Config, plots_dir: Path, eval_data: EvalData | None = None
) -> FinalEvaluation:
    """kNN (k = 10, 20, 100), linear probe, prototypes and kappa of the final teacher,
    the same kNN for the random initialisation, and the plots. ``eval_data``: the arrays the run
    already loaded (loaded here only when the run did not)."""
    teacher, _, state = load_teacher(checkpoint_dir)
    if eval_data is None:
        eval_data = load_eval_data(cfg)
    metrics: dict[str, float] = {}
    random_init: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    if eval_data is not None:
        metrics, usage = evaluate_with_usage(
            teacher, eval_data, "cpu", cfg.eval.knn_k, cfg.eval.knn_temperature, linear_probe=True
        )
        torch.manual_seed(cfg.seed)
        _, random_teacher = build_models(cfg)
        random_init = evaluate_network(random_teacher, eval_data, "cpu", cfg.eval.knn_k, cfg.eval.knn_temperature)
        plot_prototype_usage(usage.numpy(), plots_dir / "prototype_usage.png")
        arrays["usage"] = usage.numpy()
    student_norms = state.student[LAST_LAYER_PREFIX + PROTOTYPE_GAIN_SUFFIX].squeeze(1).abs()
    teacher_norms = teacher.head.prototype_norms().detach()
    for name, norms, temp in (("student", student_norms, cfg.loss.student_temp), ("teacher", teacher_norms, cfg.loss.teacher_temp)):
        for key, value in kappa_statistics(norms, temp).items():
            metrics[f"kappa_{name}_{key}"] = value
    arrays["kappa_student"] = (student_norms / cfg.loss.student_temp).numpy()
    arrays["kappa_teacher"] = (teacher_norms / cfg.loss.teacher_temp).numpy()
    plot_kappa_histogram(
        {"student": arrays["kappa_student"], "teacher": arrays["kappa_teacher"]}, plots_dir / "kappa_histogram.png"
    )
    return FinalEvaluation(metrics, random_init, arrays)


def evaluate_checkpoint(checkpoint_dir: str | os.PathLike[str], data_path: str | None = None) -> dict[str, float]:
    """Teacher metrics of a checkpoint, on its own evaluation data or on an ImageFolder."""
    teacher, cfg, _ = load_teacher(checkpoint_dir)
    if data_path is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"train_path": data_path, "test_path": data_path})})
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "imagefolder", "path": data_path})})
    eval_data = load_eval_data(cfg, split_same_folder=data_path is not None)
    if eval_data is None:
        raise FileNotFoundError(
            f"no evaluation data for data.source={cfg.data.source!r}; pass --data <ImageFolder directory>"
        )
    metrics = evaluate_network(teacher, eval_data, "cpu", cfg.eval.knn_k, cfg.eval.knn_temperature, linear_probe=True)
    for key, value in kappa_statistics(teacher.head.prototype_norms().detach(), cfg.loss.teacher_temp).items():
        metrics[f"kappa_teacher_{key}"] = value
    return metrics


@dataclass
class PretrainSummary:
    result: TrainResult
    final: FinalEvaluation
    tracking_uri: str
    mlflow_run_id: str
    export_path: Path | None


def pretrain(
    cfg: Config,
    *,
    log: Callable[[str], None] = print,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_callbacks: list[Any] | None = None,
) -> PretrainSummary:
    """Train, evaluate, export, and track it all in one MLflow run (a child run when
    ``parent_run_id`` is given, as in a sweep). A run started again under the same
    ``tracking.run_name`` continues the same MLflow run and the same Ray Train run.

    The tracking store, the data path and the checkpoint storage are resolved and checked
    here, once, before Ray starts (``raydino.plan``)."""
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking(uri)
    plan = plan_run(cfg, tracking_uri=uri)
    cfg = plan.cfg
    run_id = find_run(uri, cfg.tracking.experiment, plan.run_name)
    if run_id is None:
        all_tags = {"raydino.method": cfg.method_name, "raydino.source": cfg.data.source}
        run_id = create_run(
            uri, cfg.tracking.experiment, plan.run_name, cfg.flat(), {**all_tags, **(tags or {})}, parent_run_id
        )
    plan = dataclasses.replace(plan, mlflow_run_id=run_id)
    logger = RunLogger(uri, run_id)
    attempt = logger.reopen()
    if attempt > 1:
        log(f"raydino: continuing MLflow run {run_id} (attempt {attempt})")
    try:
        result = run_pretraining(plan, log=log, run_callbacks=run_callbacks)
        logger.log_metrics({"skipped_images": result.skipped_images, **result.crop_stats}, result.steps)
        final = FinalEvaluation({}, {})
        export_path = None
        if result.checkpoint_dir is not None:
            with tempfile.TemporaryDirectory(prefix="raydino-artifacts-") as tmp:
                plots = Path(tmp) / "plots"
                final = final_evaluation(result.checkpoint_dir, cfg, plots, result.eval_data)
                history = logger.metric_history("loss")
                if history:
                    plot_loss_curve(*zip(*history), plots / "loss_curve.png")
                logger.log_artifacts(plots, "plots")
                if final.arrays:
                    arrays_path = Path(tmp) / Path(PROTOTYPE_ARRAYS).name
                    np.savez_compressed(arrays_path, **final.arrays)
                    logger.log_artifact(arrays_path, str(Path(PROTOTYPE_ARRAYS).parent))
                export_path = export_backbone(
                    result.checkpoint_dir, result.local_run_dir / "teacher_backbone.safetensors"
                )
                logger.log_artifact(export_path, "model")
                logger.log_artifacts(result.checkpoint_dir, "checkpoint")
            logger.log_metrics({f"final_{k}": v for k, v in final.metrics.items()}, result.steps)
            logger.log_metrics({f"random_init_{k}": v for k, v in final.random_init.items()}, result.steps)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or an exit request: stopped, not broken
        logger.end_if_running("KILLED")
        raise
    except BaseException:
        logger.end_if_running("FAILED")
        raise
    logger.end("FINISHED")
    return PretrainSummary(result, final, uri, run_id, export_path)


def summary_lines(summary: PretrainSummary) -> list[str]:
    final, result = summary.final, summary.result
    lines = [f"done: {result.steps} steps; checkpoint {result.checkpoint_dir}"]
    if result.skipped_images:
        lines.append(f"skipped {result.skipped_images} unreadable image(s) (logged as skipped_images)")
    if "knn_top1" in final.metrics:
        lines.append(
            f"kNN top-1 (k=20): pretrained teacher {final.metrics['knn_top1']:.1f}%  vs  random initialisation "
            f"{final.random_init.get('knn_top1', float('nan')):.1f}%   (linear probe {final.metrics.get('linear_probe_top1', float('nan')):.1f}%, "
            f"prototypes in use {final.metrics.get('prototypes_in_use', float('nan')):.0f})"
        )
    lines.append(f"MLflow run {summary.mlflow_run_id} in {summary.tracking_uri}")
    lines.append(f"open it with: {ui_command(summary.tracking_uri)}")
    if summary.export_path:
        lines.append(f"teacher backbone: {summary.export_path}")
    return lines

