"""The reader study's figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.figures.common import finish_figure, plt

__all__ = ["save_reader_accuracy"]


def save_reader_accuracy(path: Path, result: dict) -> None:
    """Real-vs-synthetic accuracy per reader and pooled, with Wilson 95 % intervals, against chance (50 %)."""
    names = [*result["per_reader"], "pooled"]
    rows = [*(r["real_or_synthetic"] for r in result["per_reader"].values()), result["pooled"]["real_or_synthetic"]]
    acc = np.array([r["accuracy"] for r in rows])
    err = np.array([[r["accuracy"] - r["ci_low"] for r in rows], [r["ci_high"] - r["accuracy"] for r in rows]])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), acc, yerr=err, capsize=4, color=["C0"] * (len(names) - 1) + ["C1"])
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("real vs synthetic accuracy")
    ax.legend(loc="lower right")
    finish_figure(fig, path, "Reader study: telling real from synthetic (95 % Wilson CI)")
