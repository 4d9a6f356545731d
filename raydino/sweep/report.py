"""The per-arm report of a sweep (the kappa ablation's table and plots), read back from MLflow.

Everything comes from the store, not from the sweep's memory, so the same report can be
rebuilt later from any MLflow store (sqlite file or server) given the parent run id.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from raydino.eval.plots import plot_arm_values, plot_kappa_histogram, plot_usage_curves
from raydino.eval.tables import format_cell, markdown_table, metric_column
from raydino.tracking import PROTOTYPE_ARRAYS, RunLogger, search_runs

COLLAPSE_NATS = 0.1  # below this, targets are (nearly) the same for every sample


def is_collapsed(teacher_entropy: float, mean_target_entropy: float, prototypes_in_use: float = math.nan) -> bool:
    """Collapse as docs/objective.md describes it: the teacher's targets no longer depend on the
    sample. H(mean target) - mean H(target) is the information the targets carry about the
    sample (zero for uniform *and* for one-hot-on-the-same-prototype collapse); a
    mean-target entropy near zero is the one-prototype case on its own; and a single
    argmax prototype over the whole evaluation set means every sample gets the same answer."""
    if prototypes_in_use == 1:
        return True
    if math.isnan(teacher_entropy) or math.isnan(mean_target_entropy):
        return False
    return mean_target_entropy - teacher_entropy < COLLAPSE_NATS or mean_target_entropy < COLLAPSE_NATS


def child_runs(uri: str, experiment: str, parent_run_id: str) -> pd.DataFrame:
    runs = pd.DataFrame(search_runs(uri, experiment, parent_run_id))
    if runs.empty:
        raise ValueError(f"parent run {parent_run_id} has no child runs in experiment {experiment!r}")
    return runs


def with_arm_columns(runs: pd.DataFrame, arm_keys: Sequence[str]) -> pd.DataFrame:
    """A copy of ``runs`` with one column per arm key: the sweep's ``raydino.arm.<key>`` tag, or
    for runs made outside a sweep the param of that name."""
    runs = runs.copy()
    for key in arm_keys:
        column = next((c for c in (f"tags.raydino.arm.{key}", f"params.{key}") if c in runs), None)
        if column is None:
            raise ValueError(f"runs have neither a tag raydino.arm.{key} nor a param {key}")
        runs[key] = runs[column].fillna("-")
    return runs


def arm_table(runs: pd.DataFrame, arm_keys: Sequence[str]) -> pd.DataFrame:
    """One row per arm: trials by status, then over the FINISHED seeds: kNN top-1 mean and std, the
    random network's kNN (the floor a collapsed run sits at), linear probe, prototypes in use, teacher kappa median and 90% range (q05-q95, averaged
    over seeds), final teacher entropy (nats, and with the batch-mean target's as shares of log K: the
    last epoch's means), and how many seeds collapsed."""
    runs = with_arm_columns(runs, arm_keys)
    keys = list(arm_keys)
    if not keys:  # no arm keys (a seed-only sweep): one row for everything
        runs["arm"] = "all"
        keys = ["arm"]
    runs["knn"] = metric_column(runs, "final_knn_top1")
    runs["knn_random"] = metric_column(runs, "random_init_knn_top1")
    runs["probe"] = metric_column(runs, "final_linear_probe_top1")
    runs["prototypes"] = metric_column(runs, "final_prototypes_in_use")
    runs["kappa_q50"] = metric_column(runs, "final_kappa_teacher_q50")
    runs["kappa_q05"] = metric_column(runs, "final_kappa_teacher_q05")
    runs["kappa_q95"] = metric_column(runs, "final_kappa_teacher_q95")
    # the last epoch's means where the run logged them (raydino.eval.collapse), else the last step's values
    runs["entropy"] = metric_column(runs, "epoch_teacher_entropy").fillna(metric_column(runs, "teacher_entropy"))
    runs["mean_target_entropy"] = metric_column(runs, "epoch_mean_target_entropy").fillna(
        metric_column(runs, "mean_target_entropy"))
    runs["entropy_share"] = metric_column(runs, "epoch_teacher_entropy_share")
    runs["mean_target_share"] = metric_column(runs, "epoch_mean_target_entropy_share")
    runs["collapsed"] = [
        is_collapsed(h, hm, k) for h, hm, k in zip(runs["entropy"], runs["mean_target_entropy"], runs["prototypes"])
    ]
    rows = []
    for arm, group in runs.groupby(keys, sort=True):
        arm = arm if isinstance(arm, tuple) else (arm,)
        done = group[group["status"] == "FINISHED"]
        row = dict(zip(keys, arm))
        row.update(
            trials=len(group),
            finished=len(done),
            stopped=int((group["status"] == "KILLED").sum()),
            failed=int((group["status"] == "FAILED").sum()),
            knn_top1_mean=done["knn"].mean(),
            knn_top1_std=done["knn"].std(ddof=1),
            knn_random_init=done["knn_random"].mean(),
            linear_probe_top1=done["probe"].mean(),
            prototypes_in_use=done["prototypes"].mean(),
            kappa_median=done["kappa_q50"].mean(),
            kappa_q05=done["kappa_q05"].mean(),
            kappa_q95=done["kappa_q95"].mean(),
            teacher_entropy=done["entropy"].mean(),
            teacher_entropy_share=done["entropy_share"].mean(),
            mean_target_share=done["mean_target_share"].mean(),
            collapsed=f"{int(done['collapsed'].sum())}/{len(done)}",
        )
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, arm_keys: Sequence[str]) -> str:
    arm_keys = list(arm_keys) or ["arm"]
    header = [*arm_keys, "seeds", "kNN top-1", "random init", "linear probe", "prototypes in use",
              "kappa median [90% range]",
              "teacher entropy", "H / log K", "H(mean) / log K", "collapsed"]
    rows = []
    for _, r in table.iterrows():
        seeds = f"{r['finished']}/{r['trials']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        seeds += f" ({r['stopped']} stopped)" if r["stopped"] else ""
        rows.append([
            *(str(r[k]) for k in arm_keys),
            seeds,
            f"{format_cell(r['knn_top1_mean'])} ± {format_cell(r['knn_top1_std'])}",
            format_cell(r["knn_random_init"]),
            format_cell(r["linear_probe_top1"]),
            format_cell(r["prototypes_in_use"], ".0f"),
            f"{format_cell(r['kappa_median'])} [{format_cell(r['kappa_q05'])}, {format_cell(r['kappa_q95'])}]",
            format_cell(r["teacher_entropy"], ".2f"),
            format_cell(r["teacher_entropy_share"], ".2f"),
            format_cell(r["mean_target_share"], ".2f"),
            str(r["collapsed"]),
        ])
    return markdown_table(header, rows)


def _arm_name(row: pd.Series, arm_keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in arm_keys) or "all"


def write_report(
    uri: str, experiment: str, parent_run_id: str, arm_keys: Sequence[str], out_dir: str | os.PathLike[str]
) -> tuple[str, list[Path]]:
    """Table (markdown and CSV) and plots (kNN per arm, kappa histograms overlaid, prototype
    usage) for the children of one parent run; returns the markdown and the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = with_arm_columns(child_runs(uri, experiment, parent_run_id), arm_keys)
    table = arm_table(runs, arm_keys)
    markdown = to_markdown(table, arm_keys)
    files = [out / "arms.md", out / "arms.csv"]
    files[0].write_text(markdown + "\n")
    table.to_csv(files[1], index=False)

    finished = runs[runs["status"] == "FINISHED"]
    knn: dict[str, list[float]] = {}
    kappas: dict[str, list[np.ndarray]] = {}
    usages: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="raydino-report-") as tmp:
        for _, run in finished.iterrows():
            arm = _arm_name(run, arm_keys)
            knn.setdefault(arm, []).append(float(pd.to_numeric(run.get("metrics.final_knn_top1"), errors="coerce")))
            try:
                path = RunLogger(uri, run["run_id"]).download_artifact(PROTOTYPE_ARRAYS, Path(tmp) / run["run_id"])
            except Exception:  # noqa: BLE001, S112 - a run without arrays (e.g. no eval data) just has no curve
                continue
            with np.load(path) as arrays:
                if "kappa_teacher" in arrays:
                    kappas.setdefault(arm, []).append(arrays["kappa_teacher"])
                if "usage" in arrays:
                    usages.setdefault(arm, []).append(arrays["usage"])
    if knn:
        files.append(plot_arm_values(knn, "kNN top-1 (%)", out / "knn_per_arm.png"))
    if kappas:
        pooled = {arm: np.concatenate(v) for arm, v in kappas.items()}
        files.append(plot_kappa_histogram(pooled, out / "kappa_histograms.png"))
    if usages:
        mean_usage = {arm: np.mean(v, axis=0) for arm, v in usages.items()}
        files.append(plot_usage_curves(mean_usage, out / "prototype_usage.png"))
    return markdown, files
