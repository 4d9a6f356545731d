"""Markdown tables of MLflow runs, shared by ``raydino compare`` and the sweep report so both
read metrics and print missing values ("-") the same way."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd


def metric_column(runs: pd.DataFrame, name: str) -> pd.Series:
    """Metric ``name`` of every run (a ``search_runs`` frame) as numbers; NaN where a run lacks it."""
    column = f"metrics.{name}"
    return pd.to_numeric(runs[column], errors="coerce") if column in runs else pd.Series(np.nan, index=runs.index)


def format_cell(value: object, spec: str = ".1f") -> str:
    """A float in format ``spec``, NaN as ``-``; anything else as ``str``."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else format(value, spec)
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(cells) + " |" for cells in rows)
    return "\n".join(lines)
