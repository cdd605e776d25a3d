"""PNG figures of images for people: labelled image grids, image pairs with captions, and edits beside their sources
with a signed difference heat map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.figures.common import bare_axis, finish_figure, plt

__all__ = ["save_rows", "PairBlock", "save_pairs", "DIFF_CMAP", "signed_difference", "save_edit_rows"]

DIFF_CMAP = "RdBu_r"  # diverging: red = brighter in the edit (more opacity on a radiograph), blue = darker


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
