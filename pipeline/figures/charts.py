"""Charts for people (curves that ``dvc plots`` also gets as TSV): line panels against one parameter, overlaid
histograms, the utility curve against the real fraction, the counterfactual flip-rate/SSIM frontier, and Optuna's
plots."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.figures.common import finish_figure, plt

__all__ = ["save_panels", "save_histograms", "save_fraction_plot", "save_frontier", "save_optuna_figure"]


def save_panels(path: Path, x: Sequence[float], panels: dict[str, dict[str, Sequence[float]]], xlabel: str,
                title: str = "", marks: dict[str, float] | None = None) -> None:
    """Save side-by-side line charts sharing an x axis.

    Args:
        path: output PNG.
        x: values of the swept parameter.
        panels: panel title -> {series label -> y values (one per x)}.
        xlabel: name of the swept parameter.
        title: figure title.
        marks: optional horizontal reference lines, label -> y, drawn in every panel where they are in range.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, y in series.items():
            ax.plot(list(x), list(y), marker="o", label=label)
        lo, hi = ax.get_ylim()
        for label, y in (marks or {}).items():
            if lo <= y <= hi:
                ax.axhline(y, color="grey", ls="--", lw=1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    finish_figure(fig, path, title, 11)


def save_histograms(path: Path, panels: dict[str, dict[str, np.ndarray]], marks: dict[str, dict[str, float]],
                    title: str = "", bins: int = 50) -> None:
    """Save side-by-side density histograms, one panel per quantity, several samples overlaid.

    Args:
        path: output PNG.
        panels: panel title -> {series label -> values}; the series of a panel share their bins.
        marks: panel title -> {label -> x} vertical reference lines.
        title: figure title.
        bins: bins per panel.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        values = np.concatenate([np.asarray(v, np.float64) for v in series.values()])
        edges = np.histogram_bin_edges(values, bins=bins)
        for label, v in series.items():
            ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.45, label=f"{label} (N={len(v)})")
        for (label, x), color in zip(marks.get(name, {}).items(), ("black", "grey", "tab:red")):
            ax.axvline(x, color=color, ls="--", lw=1, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    finish_figure(fig, path, title, 11)


def save_fraction_plot(path: Path, rows: list[dict[str, float]], synthetic_only: dict[str, tuple[float, float]],
                       title: str) -> None:
    """Test AUC and accuracy against the real fraction (log axis), without and with synthetic images (error bars:
    std over seeds), the synthetic-only result as a dashed line with its ±std band.

    Args:
        path: output PNG.
        rows: :func:`curve_rows`.
        synthetic_only: ``{"auc": (mean, std), "acc": (mean, std)}``.
        title: figure title.
    """
    x = [r["real_fraction"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for ax, (key, label) in zip(axes, (("auc", "test AUC"), ("acc", "test accuracy"))):
        for series, name in (("real", "real only"), ("real_synthetic", "real + synthetic")):
            ax.errorbar(x, [r[f"{key}_{series}"] for r in rows], yerr=[r[f"{key}_{series}_std"] for r in rows],
                        marker="o", capsize=4, label=name)
        mean, std = synthetic_only[key]
        ax.axhline(mean, color="grey", ls="--", lw=1, label="synthetic only")
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{100 * f:g} %" for f in x])
        ax.minorticks_off()
        ax.set_xlabel("share of the real train split")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    finish_figure(fig, path, title)


def save_frontier(path: Path, rows: list[dict[str, float]], directions: dict[str, str],
                  points: dict[str, tuple[float, float, str]], title: str) -> None:
    """Flip rate against SSIM of counterfactual edits, the trade-off an operating point is chosen on.

    Args:
        path: output PNG.
        rows: the strength sweep's rows (``strength``, ``flip_<d>``, ``ssim_<d>`` per direction d): one fixed
            strength each, drawn as a line per direction with each point labelled by its t0.
        directions: direction key -> its label (``"n2p"`` -> ``"normal→pneumonia"``).
        points: direction -> (SSIM, flip rate, label) of the stage's own edits, drawn as a star.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6.6, 4.8))
    for k, d in enumerate(directions):
        color = f"C{k}"
        x, y = [r[f"ssim_{d}"] for r in rows], [r[f"flip_{d}"] for r in rows]
        ax.plot(x, y, marker="o", color=color, label=f"{directions[d]}: one fixed t0 (sweep)")
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{r['strength']:g}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color=color)
        ssim, flip, label = points[d]
        ax.plot([ssim], [flip], marker="*", markersize=15, color=color, linestyle="none",
                label=f"{directions[d]}: {label}")
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="flip rate 0.90 / SSIM 0.85 (the targets)")
    ax.axvline(0.85, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("SSIM edit vs source (higher keeps more of the image)")
    ax.set_ylabel("flip rate to the target class (evaluator)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    finish_figure(fig, path, title, 10)


def save_optuna_figure(path: Path, draw: Callable[[], object]) -> None:
    """Save the matplotlib figure of an ``optuna.visualization.matplotlib`` function, or a note saying why not."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        except (ValueError, RuntimeError) as exc:  # e.g. importances need two complete trials
            fig, ax = plt.subplots(figsize=(6, 2))
            ax.axis("off")
            ax.text(0.5, 0.5, f"not drawn: {exc}", ha="center", va="center", wrap=True, fontsize=9)
    fig.set_size_inches(7, 4.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
