"""Stage ``reader_study``: a blinded reader-study package from the cohort, real test images and the counterfactual
pairs (:mod:`pipeline.evaluation.reader_study`): (1) real or synthetic, with confidence 1–5, balanced per class and
source; (2) normal or pneumonia, real and synthetic images mixed; (3) counterfactual pairs: does the edit show the
target finding, is it the same child (Likert 1–5).

The package (``--out``, a folder holding one ``study.html``) is a static page that works from ``file://``: a reader
answers in the browser and exports a JSON file. Images are Lanczos-resized from 28 px to ``image_size`` px, real and
synthetic alike; the order is shuffled by ``seed``; items carry opaque ids. The answer key (``--key``) is written
outside the package. No patient identifier exists anywhere (PneumoniaMNIST has none; the files name none). Score the
answers with ``python -m pipeline.score_reader_study``. Reads the ``reader_study`` section.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, load_npz, write_json
from pipeline.core.cli import params_option, run_stage
from pipeline.core.data import CLASSES, real_images
from pipeline.evaluation.reader_study import build_items, make_key, study_id
from pipeline.formats.questionnaire import questionnaire_html

SECTION = "reader_study"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (its test split gives the real images)."),
    samples: Path = typer.Option(..., help="The cohorts folder (sample): the label-matched cohort."),
    edits: Path = typer.Option(..., help="The counterfactual pairs (data/counterfactuals.npz)."),
    out: Path = typer.Option(..., help="Output package folder (study.html)."),
    key: Path = typer.Option(..., help="Output answer key JSON (keep it away from the readers)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON: the study id and the item counts."),
    params: Path = params_option(),
    seed: int = typer.Option(..., help="Seeds the choice of images and their order."),
    n_per_cell: int = typer.Option(..., min=1, help="Part 1 images per class and source (real test, synthetic)."),
    n_label: int = typer.Option(..., min=1, help="Part 2 images per class and source."),
    n_pairs: int = typer.Option(..., min=0, help="Part 3 counterfactual pairs (at most those the stage made)."),
    image_size: int = typer.Option(..., min=28, help="Side in pixels the images are shown at (Lanczos)."),
) -> None:
    """Write the blinded study page, its answer key and the item counts."""
    t0 = time.time()
    cohort = load_npz(samples / "cohort_matched.npz", ("images", "labels"), "sample")
    pairs = load_npz(edits, ("sources", "edits", "source_labels", "target_labels"), "counterfactual")
    items = build_items(real_images(data, "test"), (cohort["images"], cohort["labels"]), pairs, n_per_cell, n_label,
                        n_pairs, seed)
    sid = study_id(items)
    shown = [(i.id, i.part, i.images, CLASSES[i.truth["target_label"]] if i.part == "counterfactual" else None)
             for i in items]
    counts = {f"n_{p}": sum(i.part == p for i in items) for p in ("real_or_synthetic", "label", "counterfactual")}
    with atomic_outputs(out, key, metrics) as (tmp_out, tmp_key, tmp_metrics):
        tmp_out.mkdir()
        (tmp_out / "study.html").write_text(questionnaire_html(sid, shown, image_size))
        write_json(tmp_key, make_key(items, sid))
        write_json(tmp_metrics, {**counts, "n_items": len(items),
                                 "image_size": image_size, "wall_time_s": round(time.time() - t0, 2)})
    typer.echo(f"reader study {sid}: {len(items)} items -> {out / 'study.html'}; key {key}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
