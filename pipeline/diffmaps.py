"""PNG figures of edits for people: one row per image, source | edit | signed difference heat map (| edit back)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.plots import bare_axis  # noqa: E402

__all__ = ["signed_difference", "save_edit_rows"]

DIFF_CMAP = "RdBu_r"  # diverging: red = brighter in the edit (more opacity on a radiograph), blue = darker


def signed_difference(edit: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``edit − source`` of uint8 images, as float in [−1, 1]."""
    return (edit.astype(np.float32) - source.astype(np.float32)) / 255.0


def save_edit_rows(path: Path, sources: np.ndarray, edits: np.ndarray, row_labels: Sequence[str], title: str = "",
                   backs: np.ndarray | None = None, cell: float = 1.3) -> None:
    """Save one row per image: source, edit, the signed difference ``edit − source`` with a shared diverging colour
    scale (symmetric around 0, so white means unchanged), and optionally the edit edited back to the source label.

    Args:
        path: output PNG.
        sources: uint8 N×H×W.
        edits: uint8 N×H×W, the same N.
        row_labels: one label per row.
        title: figure title.
        backs: optional uint8 N×H×W, the edits edited back to the source label.
        cell: size of one image in inches.
    """
    diffs = signed_difference(edits, sources)
    vmax = max(float(np.abs(diffs).max()), 1 / 255)
    columns = ["source", "edit", "edit − source"] + (["edit back"] if backs is not None else [])
    n = len(sources)
    fig, axes = plt.subplots(n, len(columns), figsize=(cell * len(columns) + 2.2, cell * n + 0.9), squeeze=False)
    heat = None
    for r in range(n):
        shown = [sources[r], edits[r], diffs[r]] + ([backs[r]] if backs is not None else [])
        for c, image in enumerate(shown):
            ax = axes[r, c]
            bare_axis(ax)
            if c == 2:
                heat = ax.imshow(image, cmap=DIFF_CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest")
            else:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r, 0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    right = 1 - 1.0 / fig.get_figwidth()  # room for the colour bar
    fig.tight_layout(rect=(0, 0, right, 1))
    if heat is not None:
        bar = fig.colorbar(heat, cax=fig.add_axes((right + 0.1 / fig.get_figwidth(), 0.2, 0.12 / fig.get_figwidth(),
                                                    0.6)))
        bar.set_label("edit − source (grey levels / 255)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
