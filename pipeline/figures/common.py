"""What every figure module shares: matplotlib without a display, the axis and figure helpers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "bare_axis", "finish_figure"]


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


