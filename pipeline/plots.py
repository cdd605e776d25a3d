"""PNG figures for people: labelled image grids, and the axis and figure helpers every figure module shares."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["bare_axis", "finish_figure", "save_rows"]


def bare_axis(ax: plt.Axes) -> None:
    """No ticks and no frame: an axis that only shows an image."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def finish_figure(fig: plt.Figure, path: Path, title: str = "", fontsize: float = 10) -> None:
    """Add the title (if any), lay the figure out, save it as a 100-dpi PNG and close it."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def save_rows(path: Path, rows: Sequence[tuple[str, np.ndarray]], title: str = "", cell: float = 0.9) -> None:
    """Save a grid with one labelled row per entry.

    Args:
        path: output PNG.
        rows: (label, images) pairs; images are N×H×W, uint8 or float in [0, 1]. Rows may differ in length.
        title: figure title.
        cell: size of one image in inches.
    """
    ncol = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(cell * ncol + 1.2, cell * len(rows) + 0.5), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            bare_axis(ax)
            if c < len(imgs):
                vmax = 255 if imgs.dtype == np.uint8 else 1.0
                ax.imshow(imgs[c], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    finish_figure(fig, path, title)
