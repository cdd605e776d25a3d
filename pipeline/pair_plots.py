"""PNG figures for people checking memorisation: image pairs with captions, and overlaid distance histograms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.plots import bare_axis, finish_figure  # noqa: E402

__all__ = ["PairBlock", "save_pairs", "save_histograms"]


@dataclass
class PairBlock:
    """Two rows of a pair figure: query images above their matches, one caption per column."""

    top_label: str
    bottom_label: str
    top: np.ndarray
    bottom: np.ndarray
    captions: Sequence[str]


def save_pairs(path: Path, blocks: Sequence[PairBlock], title: str = "", cell: float = 0.9) -> None:
    """Save blocks of image pairs (uint8 N×H×W), each column captioned above its top image.

    Args:
        path: output PNG.
        blocks: pair blocks, drawn top to bottom; blocks may hold different numbers of pairs.
        title: figure title.
        cell: size of one image in inches.
    """
    ncol = max(1, max(len(b.top) for b in blocks))
    size = (max(cell * ncol + 1.6, 7.0), 1.35 * cell * 2 * len(blocks) + 0.8)  # room for captions and the title
    fig, axes = plt.subplots(2 * len(blocks), ncol, figsize=size, squeeze=False)
    for b, block in enumerate(blocks):
        for row, (label, imgs) in enumerate(((block.top_label, block.top), (block.bottom_label, block.bottom))):
            r = 2 * b + row
            for c in range(ncol):
                bare_axis(axes[r, c])
                if c < len(imgs):
                    axes[r, c].imshow(imgs[c], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                    if row == 0:
                        axes[r, c].set_title(block.captions[c], fontsize=6.5)
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    finish_figure(fig, path, title)


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
