"""Stage ``report``: one self-contained HTML page of the run, and the headline metrics beside the detailed ones.

The page (``metrics/report.html``, readable offline from ``file://``: every image inline, no script, nothing from the
network) holds the model card (intended use, data, training, results, limits: the 28×28 resolution first), every
target of :mod:`pipeline.evaluation.targets` against its measurement, the stages' figures, synthetic images per class
and counterfactual pairs (source | edit | amplified change | edit back) upscaled ``upscale`` times with nearest-
neighbour pixels, so that one model pixel stays one visible square, the TSV curves drawn one quantity per axis, every
metric, the params file and the git revision. ``metrics/headline.json`` holds the targets' figures alone (``dvc
metrics show metrics/headline.json``: a dozen keys instead of the 400 of all files). Reads the ``report`` section.
"""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path

import numpy as np
import typer
from PIL import Image

from pipeline.core.artifacts import atomic_outputs, load_npz, write_json
from pipeline.core.cli import params_option, run_stage
from pipeline.core.data import CLASSES
from pipeline.evaluation.targets import evaluate_targets, headline
from pipeline.figures.report import metrics_of, render_report

SECTION = "report"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


def git_revision(cwd: Path) -> str:
    """``git describe --always --dirty`` of the working tree, or ``unknown`` outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=cwd, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mosaic(rows: list[list[np.ndarray]], gap: int = 2) -> bytes:
    """A PNG of uint8 images laid out in rows (white gaps), at their own pixel size."""
    h, w = rows[0][0].shape
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def change_image(source: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """|edit − source| scaled so that the largest change of the pair is white (grey 0 = no change)."""
    diff = np.abs(edit.astype(np.int16) - source.astype(np.int16)).astype(np.float32)
    return (255 * diff / max(float(diff.max()), 1.0)).round().astype(np.uint8)


@app.command()
def main(
    metrics_dir: Path = typer.Option(..., help="The stages' metrics folder (metrics/); the report reads the files "
                                     "that --metrics names in it."),
    plots_dir: Path = typer.Option(..., help="The stages' figures folder (metrics/plots/); the report shows the files "
                                   "that --figures and --curves name in it."),
    samples: Path = typer.Option(..., help="The cohorts folder (sample): its label-matched cohort is shown."),
    edits: Path = typer.Option(..., help="The counterfactual pairs (counterfactual: data/counterfactuals.npz)."),
    params_file: Path = typer.Option(..., help="The params file, shown in the report as it is."),
    out: Path = typer.Option(..., help="Output HTML page."),
    headline_file: Path = typer.Option(..., help="Output headline metrics JSON (the targets' figures alone)."),
    params: Path = params_option(),
    title: str = typer.Option(..., help="Title of the page."),
    upscale: int = typer.Option(..., min=1, help="Image grids are shown this many times their pixel size, "
                                "nearest-neighbour."),
    n_per_class: int = typer.Option(..., min=1, help="Synthetic images shown per class."),
    metrics: list[str] = typer.Option(..., help="The metrics files shown (names in --metrics-dir; each a dep in "
                                      "dvc.yaml)."),
    figures: list[str] = typer.Option(..., help="The PNG figures shown (names in --plots-dir)."),
    curves: list[str] = typer.Option(..., help="The TSV curves drawn, one quantity per axis (names in --plots-dir)."),
) -> None:
    """Write the run's HTML report and its headline metrics."""
    t0 = time.time()
    detailed = metrics_of([metrics_dir / name for name in metrics])
    rows = evaluate_targets(detailed)
    cohort = load_npz(samples / "cohort_matched.npz", ("images", "labels"), "sample")
    grids = [[img for img in cohort["images"][cohort["labels"] == c][:n_per_class]] for c in range(len(CLASSES))]
    pairs = load_npz(edits, ("sources", "edits", "reversed", "source_labels"), "counterfactual")
    pair_rows = [[s, e, change_image(s, e), r] for s, e, r in zip(pairs["sources"], pairs["edits"], pairs["reversed"])]
    made = {"synthetic_cohort_per_class.png": mosaic([g for g in grids if g]),
            "counterfactual_pairs.png": mosaic(pair_rows)}
    shown = [(name, png, upscale) for name, png in made.items()] + [(n, (plots_dir / n).read_bytes(), 1) for n in figures]
    page = render_report(title, git_revision(params_file.resolve().parent), rows, shown, [plots_dir / n for n in curves], detailed,
                         params_file.read_text())
    with atomic_outputs(out, headline_file) as (tmp_out, tmp_headline):
        tmp_out.write_text(page)
        write_json(tmp_headline, {**headline(rows), "wall_time_s": round(time.time() - t0, 2)})
    met = sum(1 for r in rows if r["met"])
    typer.echo(f"report: {out} ({len(page) / 1e6:.1f} MB); {met} of "
               f"{sum(1 for r in rows if r['met'] is not None)} measured targets met", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
