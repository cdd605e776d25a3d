"""Line charts for people (curves that ``dvc plots`` also gets as TSV): one panel per metric against one parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.plots import finish_figure  # noqa: E402

__all__ = ["save_panels"]


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
