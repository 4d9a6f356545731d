"""``raydino compare``: group MLflow runs by parameters and tabulate their metrics.

Reads runs through MLflow's search API (any store: sqlite file or server), groups them
by the chosen params (e.g. ``loss.vmf head.norm_last_layer``), and reports per group the
mean, standard deviation and count of each metric; writes one bar plot per metric.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from raydino.eval.tables import format_cell, markdown_table, metric_column
from raydino.tracking import search_runs

DEFAULT_METRICS = ("final_knn_top1", "final_linear_probe_top1", "final_prototypes_in_use", "teacher_entropy")

RUN_STATUSES = ("FINISHED", "RUNNING", "FAILED", "KILLED", "SCHEDULED")
"""MLflow's run statuses; ``raydino compare --status`` takes these or ``all``."""


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per group: group keys, runs, [status,] then <metric> mean and <metric> std
    group_by: list[str]
    metrics: list[str]
    left_out: dict[str, int] = field(default_factory=dict)
    """Runs not compared because of their status: status -> count."""


def _status_counts(statuses: pd.Series) -> str:
    """``3 FINISHED, 1 FAILED``: a group's (or the left-out runs') statuses."""
    return ", ".join(f"{n} {status}" for status, n in statuses.value_counts().sort_index().items())


def compare_runs(
    uri: str,
    experiment: str,
    group_by: Sequence[str],
    metrics: Sequence[str] | None = None,
    parent_run_id: str | None = None,
    statuses: Sequence[str] | None = ("FINISHED",),
) -> Comparison:
    """Group the runs whose status is one of ``statuses`` (None: every run) and tabulate ``metrics``
    (None: the DEFAULT_METRICS the runs have, else their first six); a metric named explicitly that no
    run has is an error, as is a ``group_by`` param. A ``status`` column appears when runs other than
    FINISHED ones are compared."""
    runs = pd.DataFrame(search_runs(uri, experiment, parent_run_id))
    under = f" under parent {parent_run_id}" if parent_run_id else ""
    if runs.empty:
        raise ValueError(f"experiment {experiment!r} has no runs{under}")
    left_out: dict[str, int] = {}
    if statuses is not None:
        unknown = [s for s in statuses if s not in RUN_STATUSES]
        if unknown:
            raise ValueError(f"unknown run status(es) {', '.join(unknown)}; choose from {', '.join(RUN_STATUSES)}")
        keep = runs["status"].isin(list(statuses))
        left_out = {str(k): int(v) for k, v in runs.loc[~keep, "status"].value_counts().sort_index().items()}
        runs = runs[keep].reset_index(drop=True)
        if runs.empty:
            raise ValueError(
                f"experiment {experiment!r} has no {' or '.join(statuses)} runs{under} "
                f"(it has {', '.join(f'{n} {s}' for s, n in left_out.items())}); add --status all to compare them"
            )
    missing = [k for k in group_by if f"params.{k}" not in runs]
    if missing:
        known = sorted(c.removeprefix("params.") for c in runs if c.startswith("params."))
        raise ValueError(f"no run has param(s) {', '.join(missing)}; known params: {', '.join(known[:40])}")
    known_metrics = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
    if metrics:
        unknown = [m for m in metrics if m not in known_metrics]
        if unknown:
            raise ValueError(
                f"no run has metric(s) {', '.join(unknown)}; known metrics: {', '.join(known_metrics[:60]) or 'none'}"
            )
    else:
        metrics = [m for m in DEFAULT_METRICS if m in known_metrics] or known_metrics[:6]
    keys = [f"params.{k}" for k in group_by] or ["run_name"]  # no grouping: one row per run
    runs[keys] = runs[keys].fillna("-")
    table = runs.groupby(keys, sort=True).size().rename("runs").to_frame()
    if set(runs["status"]) != {"FINISHED"}:
        table["status"] = runs.groupby(keys, sort=True)["status"].agg(_status_counts)
    for m in metrics:
        by_group = metric_column(runs, m).groupby([runs[k] for k in keys])
        table[f"{m} mean"] = by_group.mean()
        table[f"{m} std"] = by_group.std(ddof=1)
    table = table.reset_index()
    table.columns = [c.removeprefix("params.") for c in table.columns]
    return Comparison(table, [k.removeprefix("params.") for k in keys], list(metrics), left_out)


def to_markdown(comparison: Comparison) -> str:
    cols = list(comparison.table.columns)
    return markdown_table(cols, ([format_cell(row[c], ".4g") for c in cols] for _, row in comparison.table.iterrows()))


def to_csv(comparison: Comparison) -> str:
    return comparison.table.to_csv(index=False)


def write_plots(comparison: Comparison, out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per metric: group means with standard-deviation error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison.table
    labels = [", ".join(f"{k}={row[k]}" for k in comparison.group_by) for _, row in table.iterrows()]
    paths = []
    for m in comparison.metrics:
        fig = Figure(figsize=(max(4, 1.2 * len(labels)), 3.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.bar(range(len(labels)), table[f"{m} mean"], yerr=table[f"{m} std"].fillna(0), capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(m)
        ax.set_title(f"{m} by {', '.join(comparison.group_by)}")
        path = out / f"compare_{m}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
