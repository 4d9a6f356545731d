"""Small diagnostic plots written straight to PNG.

Uses ``matplotlib.figure.Figure`` with the Agg canvas instead of pyplot: no display is
needed, no global backend is switched under other code, and no figures leak in pyplot's
registry during long training runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    return out


def plot_kappa_histogram(kappas: Mapping[str, np.ndarray], path: str | os.PathLike[str], bins: int = 50) -> Path:
    """Overlaid kappa histograms (e.g. student vs teacher, or one per arm) on shared bins so
    the shapes are directly comparable."""
    arrays = {name: np.asarray(v, dtype=np.float64).reshape(-1) for name, v in kappas.items()}
    if not arrays:
        raise ValueError("kappas is empty")
    edges = np.histogram_bin_edges(np.concatenate(list(arrays.values())), bins=bins)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    style = {"alpha": 0.5} if len(arrays) <= 2 else {"histtype": "step", "linewidth": 1.5}  # many arms: outlines
    for name, values in arrays.items():
        ax.hist(values, bins=edges, label=f"{name} (median {np.median(values):.3g})", **style)
    ax.set(xlabel="kappa = ||w_k|| / tau", ylabel="prototypes", title="Prototype precisions")
    ax.legend(fontsize=7 if len(arrays) > 2 else None)
    return _save(fig, path)


def plot_prototype_usage(usage: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Usage sorted in decreasing order on a log y axis: the tail shows how fast usage decays
    and where it hits zero (unused prototypes cannot be drawn on a log axis, so they are
    counted in the title instead)."""
    u = np.sort(np.asarray(usage, dtype=np.float64).reshape(-1))[::-1]
    used = u[u > 0]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(used) + 1), used, drawstyle="steps-post")
    ax.set_yscale("log")
    ax.set(xlabel="prototype rank", ylabel="fraction of samples (argmax)", title=f"{len(used)} of {len(u)} used")
    return _save(fig, path)


def plot_loss_curve(steps: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray,
                    path: str | os.PathLike[str]) -> Path:
    """Training loss against step."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(np.asarray(steps), np.asarray(losses))
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_usage_curves(usages: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Sorted prototype usage of several arms overlaid (log y): where each curve ends is how
    many prototypes that arm uses."""
    if not usages:
        raise ValueError("usages is empty")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, usage in usages.items():
        u = np.sort(np.asarray(usage, dtype=np.float64).reshape(-1))[::-1]
        used = u[u > 0]
        ax.plot(np.arange(1, len(used) + 1), used, drawstyle="steps-post", label=f"{name} ({len(used)} used)")
    ax.set_yscale("log")
    ax.set(xlabel="prototype rank", ylabel="fraction of samples (argmax)", title="Prototype usage per arm")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_arm_values(values: Mapping[str, Sequence[float]], label: str, path: str | os.PathLike[str]) -> Path:
    """One bar per arm at the mean over seeds, with every seed drawn as a dot (the spread
    over a handful of seeds is better shown than summarised)."""
    if not values:
        raise ValueError("values is empty")
    names = list(values)
    fig = Figure(figsize=(max(5, 1.1 * len(names)), 4))
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        seeds = np.asarray(values[name], dtype=np.float64)
        ax.bar(i, np.nanmean(seeds), color="C0", alpha=0.5)
        ax.scatter(np.full(len(seeds), i), seeds, color="C1", zorder=3, s=14)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=7)
    ax.set(ylabel=label, title=f"{label} per arm (bars: mean; dots: seeds)")
    return _save(fig, path)
