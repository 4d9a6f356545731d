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
from raydino.data.embedded import embedded_location
from raydino.data.eval_data import load_eval_data
from raydino.eval.attention import has_cls_attention, plot_attention_grid
from raydino.eval.data import EvalData
from raydino.eval.evaluate import evaluate_network, evaluate_with_usage
from raydino.eval.knn import raw_pixel_knn_top1
from raydino.eval.plots import plot_kappa_histogram, plot_loss_curve, plot_prototype_usage
from raydino.eval.prototypes import kappa_statistics
from raydino.launch.plan import RunPlan, check_resumable, latest_checkpoint_config, plan_run
from raydino.models.param_groups import LAST_LAYER_PREFIX, PROTOTYPE_GAIN_SUFFIX
from raydino.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from raydino.step import build_models
from raydino.tracking import (
    PROTOTYPE_ARRAYS,
    LoggedBackbone,
    RunLogger,
    check_tracking,
    create_run,
    dataset_name,
    experiment_url,
    find_run,
    log_backbone_model,
    log_dataset,
    resolve_tracking_uri,
    ui_command,
)
from raydino.train.driver import TrainResult, prepare_cluster, run_pretraining
from raydino.train.export import export_backbone, load_teacher, timm_kwargs


def _extends(plan: RunPlan, checkpoint: tuple[str, Config] | None) -> bool:
    """A finished run started again with more epochs than its ``checkpoint`` was trained for: it continues."""
    return checkpoint is not None and plan.cfg.optim.epochs > checkpoint[1].optim.epochs


class RunComplete(Exception):
    """A run started again under the name of one that ended FINISHED: nothing to do, and its MLflow run
    (status, duration) is left as it was."""

    def __init__(self, run_name: str, run_id: str, tracking_uri: str) -> None:
        self.run_name, self.run_id, self.tracking_uri = run_name, run_id, tracking_uri
        super().__init__(
            f"run {run_name!r} is complete (MLflow run {run_id} in {tracking_uri} ended FINISHED); nothing to do. "
            "To train it longer, raise optim.epochs (it continues from its last checkpoint); to train again, "
            "choose another tracking.run_name"
        )


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, its MLflow run ended KILLED: says where it stopped and how to resume."""

    def __init__(self, plan: RunPlan, step: int, sigterm: bool = False) -> None:
        found = latest_checkpoint_config(plan.run_dir)
        saved = f"last checkpoint: {found[0]}" if found else "no checkpoint yet: a rerun starts from step 0"
        self.sigterm = sigterm
        super().__init__(
            f"run {plan.run_name!r} stopped at step {max(step, 0)} ({saved}); rerun with "
            f"tracking.run_name={plan.run_name} to resume it"
        )


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
            teacher, eval_data, "cpu", cfg.eval.knn_k, cfg.eval.knn_temperature, linear_probe=True,
            vmf_temperature=cfg.usage_temperature,
        )
        torch.manual_seed(cfg.seed)
        _, random_teacher = build_models(cfg)
        random_init = evaluate_network(random_teacher, eval_data, "cpu", cfg.eval.knn_k, cfg.eval.knn_temperature)
        metrics["raw_pixels_knn_top1"] = raw_pixel_knn_top1(eval_data, 20, cfg.eval.knn_temperature)
        plot_prototype_usage(usage.numpy(), plots_dir / "prototype_usage.png")
        arrays["usage"] = usage.numpy()
        if has_cls_attention(teacher.backbone):  # DINO's picture: [CLS] attention on a few test images
            plot_attention_grid(teacher.backbone, eval_data.test_images[:4], plots_dir / "attention_grid.png")
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
    metrics = evaluate_network(teacher, eval_data, "cpu", cfg.eval.knn_k, cfg.eval.knn_temperature, linear_probe=True,
                               vmf_temperature=cfg.usage_temperature)
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
    model: LoggedBackbone | None = None
    """The teacher backbone as an MLflow model (None with ``tracking.log_model=false``, or if logging it failed:
    see the run's log)."""


def log_run_dataset(uri: str, run_id: str, cfg: Config, num_images: int, log: Callable[[str], None]) -> None:
    """The run's training data as an MLflow dataset input (name, location, digest, image count), so the
    runs table's Dataset column says what each run trained on. A failure costs a warning line, not the run."""
    try:
        profile: dict[str, Any] = {"data.source": cfg.data.source}
        if cfg.data.max_files is not None:  # a seeded sample of the directory: other seeds, other images
            profile.update({"data.max_files": cfg.data.max_files, "seed": cfg.seed})
        location = cfg.data.path or embedded_location(cfg.data.source)
        name = dataset_name(cfg.data.path) if cfg.data.path else cfg.data.source
        log_dataset(uri, run_id, name=name, location=location, num_images=num_images, profile=profile)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never fail a run
        log(f"raydino: warning: the dataset input was not logged to MLflow ({type(exc).__name__}: {str(exc)[:300]})")


def backbone_example(backbone: torch.nn.Module, cfg: Config, seed: int = 0) -> np.ndarray:
    """A small preprocessed input for ``log_backbone_model`` to trace: 2 images (so the batch stays
    dynamic) of 2 x 2 patches (so the stored example stays small), ImageNet-normalised noise."""
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    size = 2 * int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch else cfg.model.img_size
    size = min(size, cfg.model.img_size)
    pixels = np.random.default_rng(seed).random((2, 3, size, size), dtype=np.float32)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return (pixels - mean) / std


def log_teacher_model(
    uri: str, run_id: str, checkpoint_dir: Path, step: int, log: Callable[[str], None]
) -> LoggedBackbone | None:
    """The checkpoint's teacher backbone as an MLflow model of the run ("teacher_backbone": images in,
    [CLS] embeddings out), registered under ``tracking.register_model`` when set. A failure costs a
    warning line, not the run: the safetensors export is logged either way."""
    try:
        teacher, cfg, _ = load_teacher(checkpoint_dir)
        metadata = {
            "input": "float32 (N, 3, H, W); H, W multiples of the patch size (trained at model.img_size)",
            "preprocessing": "RGB in [0, 1], then (x - mean) / std per channel; grayscale repeated to 3 channels "
            "(raydino.models.preprocess.normalize_crops)",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "output": "the teacher backbone's [CLS] features, as raydino's kNN evaluation uses them",
            "img_size": cfg.model.img_size,
            "timm_model": cfg.model.name,
            "timm_kwargs": timm_kwargs(cfg),
            "method": cfg.method_name,
        }
        logged = log_backbone_model(
            uri, run_id, teacher.backbone, backbone_example(teacher.backbone, cfg),
            registered_name=cfg.tracking.register_model, metadata=metadata, step=step,
        )
    except Exception as exc:  # noqa: BLE001 - the run's result is the checkpoint; the model is a view of it
        log(f"raydino: warning: the teacher backbone was not logged as an MLflow model ({type(exc).__name__}: "
            f"{str(exc)[:300]})")
        return None
    registered = f", registered as {logged.registered_name!r} version {logged.version}" if logged.version else ""
    log(f"raydino: teacher backbone logged as MLflow model {logged.model_uri}{registered}")
    return logged


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
    here, once, before Ray starts (``raydino.launch.plan``)."""
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking(uri)
    plan = plan_run(cfg, tracking_uri=uri)
    cfg = plan.cfg
    run_id = find_run(uri, cfg.tracking.experiment, plan.run_name)
    checkpoint = check_resumable(plan)
    if run_id is not None and RunLogger(uri, run_id).status() == "FINISHED" and not _extends(plan, checkpoint):
        raise RunComplete(plan.run_name, run_id, uri)
    prepare_cluster(cfg, log)
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
        result = run_pretraining(
            plan, log=log, run_callbacks=run_callbacks,
            on_source=lambda n: log_run_dataset(uri, run_id, cfg, n, log),
        )
        logger.log_metrics({"skipped_images": result.skipped_images, **result.crop_stats}, result.steps)
        final = FinalEvaluation({}, {})
        export_path = None
        model = None
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
            if cfg.tracking.log_model:  # after the final metrics: linked to them
                model = log_teacher_model(uri, run_id, result.checkpoint_dir, result.steps, log)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: stopped, not broken; the checkpoints stay
        logger.end_if_running("KILLED")
        raise RunInterrupted(plan, logger.last_step("epoch"), sigterm=getattr(exc, "sigterm", False)) from None
    except SystemExit:  # an exit request: stopped, not broken
        logger.end_if_running("KILLED")
        raise
    except BaseException:
        logger.end_if_running("FAILED")
        raise
    logger.end("FINISHED")
    return PretrainSummary(result, final, uri, run_id, export_path, model)


def prototype_norm_line(metrics: Mapping[str, float]) -> str:
    """The spread of the vMF precisions kappa = ||w_k|| / tau at the end: what lets DINO-vMF differ from
    DINO (with equal norms the vMF term is a constant and DINO-vMF is DINO)."""
    parts = []
    for name in ("student", "teacher"):
        q05, q50, q95 = (metrics[f"kappa_{name}_{q}"] for q in ("q05", "q50", "q95"))
        parts.append(f"{name} {q05:.3g}..{q95:.3g} (median {q50:.3g}, q95/q05 {q95 / q05:.3f})")
    return "prototype precision kappa, q05..q95: " + "; ".join(parts)


def summary_lines(summary: PretrainSummary) -> list[str]:
    final, result = summary.final, summary.result
    lines = [f"done: {result.steps} steps; checkpoint {result.checkpoint_dir}"]
    if result.skipped_images:
        lines.append(f"skipped {result.skipped_images} unreadable image(s) (logged as skipped_images)")
    if "knn_top1" in final.metrics:
        lines.append(
            f"kNN top-1 (k=20): pretrained teacher {final.metrics['knn_top1']:.1f}%  vs  random initialisation "
            f"{final.random_init.get('knn_top1', float('nan')):.1f}%  vs  raw pixels "
            f"{final.metrics.get('raw_pixels_knn_top1', float('nan')):.1f}%   (linear probe "
            f"{final.metrics.get('linear_probe_top1', float('nan')):.1f}%, "
            f"prototypes in use {final.metrics.get('prototypes_in_use', float('nan')):.0f})"
        )
    if "epoch_teacher_entropy_share" in result.metrics:
        share, mean_share = (result.metrics[f"epoch_{k}_share"] for k in ("teacher_entropy", "mean_target_entropy"))
        lines.append(
            f"teacher targets over the last epoch: entropy {share:.2f} log K, batch-mean target {mean_share:.2f} "
            f"log K ({mean_share - share:+.2f} log K: what the targets say about the sample; 0 at either collapse)"
        )
    if "kappa_student_q05" in final.metrics:
        lines.append(prototype_norm_line(final.metrics))
    if result.metrics.get("collapsed"):
        lines.append("collapse: the last epoch was collapsed (the warning above; MLflow tag raydino.collapse, "
                     "metric collapsed); its kNN is not the method's")
    lines.append(f"MLflow run {summary.mlflow_run_id} in {summary.tracking_uri}")
    lines.append(f"open it with: {ui_command(summary.tracking_uri)}")
    lines.append(f"  the runs table: {experiment_url(summary.tracking_uri, summary.mlflow_run_id)}")
    if summary.export_path:
        lines.append(f"teacher backbone: {summary.export_path}")
    if summary.model:
        lines.append(f"MLflow model: {summary.model.model_uri} (mlflow.pyfunc.load_model: images in, embeddings out)")
    return lines

