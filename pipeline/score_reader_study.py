"""Score a reader study: the answer key (reader_study stage) and any number of readers' answer files. Not a DVC stage
(the answers come from people).

    python -m pipeline.score_reader_study --key data/reader_study_key.json answers_*.json \
        --metrics reader_scores.json --figure reader_scores.png

Writes per reader and pooled: real-vs-synthetic accuracy with a Wilson 95 % interval and an exact binomial test
against 50 % (a reader who cannot tell them apart scores near 50 %), label accuracy on synthetic and on real images,
the Likert means of the edits (shows the finding; same child), and Fleiss' κ between readers; and a figure of the
accuracies with their intervals. An answer file of another study, with missing or duplicate items, or a key that was
changed, stops with one line naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, write_json
from pipeline.core.cli import PipelineError, run_command
from pipeline.evaluation.reader_study import read_answers, read_key, score
from pipeline.figures.reader import save_reader_accuracy

SECTION = None  # no params
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    answers: list[Path] = typer.Argument(..., help="Answer files exported by readers from study.html."),
    key: Path = typer.Option(..., help="The answer key the reader_study stage wrote."),
    metrics: Path = typer.Option(..., help="Output JSON with the scores."),
    figure: Path = typer.Option(..., help="Output PNG: real-vs-synthetic accuracy per reader and pooled."),
) -> None:
    """Score every answer file against the key."""
    k = read_key(key)
    readers = [read_answers(p, k) for p in answers]
    ids = [r["reader_id"] for r in readers]
    if len(set(ids)) != len(ids):
        raise PipelineError(f"reader id(s) {sorted({i for i in ids if ids.count(i) > 1})} appear in more than one "
                            "answer file")
    result = {"study_id": k["study_id"], **score(k, readers)}
    with atomic_outputs(metrics, figure) as (tmp_metrics, tmp_figure):
        write_json(tmp_metrics, result)
        save_reader_accuracy(tmp_figure, result)
    pooled = result["pooled"]["real_or_synthetic"]
    typer.echo(f"{len(readers)} reader(s): real vs synthetic {pooled['accuracy']:.2f} "
               f"(95 % CI {pooled['ci_low']:.2f}-{pooled['ci_high']:.2f}, p vs 50 % {pooled['p_vs_50']:.3g})",
               err=True)


if __name__ == "__main__":
    run_command(app, SECTION)
