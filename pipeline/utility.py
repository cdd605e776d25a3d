"""Stage ``utility``: are the synthetic images useful for training? Train-on-synthetic, test-on-real, and low-data.

The runs on real images alone do not depend on the cohort: the ``utility_real`` stage trains them (its
``utility_real.json``), so a sampling experiment reruns only the runs with synthetic images here.

The evaluator's recipe (:func:`pipeline.evaluation.classifier.train_evaluator`: same network, augmentation, optimiser, EMA, and
the same validation-based selection of the epoch by AUC and of the threshold by Youden's J on the real val split) is
retrained on:

- ``syn_only``: the label-matched synthetic cohort alone (same N and class counts as the real train split);
- ``real<p>``: a stratified, seeded share p of the real train split (1.0 always: ``real100`` is the train-on-real
  baseline, trained once), for each of ``fractions``;
- ``real<p>_syn``: that same real subset plus the synthetic cohort (a stratified ``synthetic_fraction`` of it).

The runs are spread over the CPU cores (one training per core). Every run is scored on the real test split (AUC, and accuracy at the val-chosen threshold), once per seed (a seed
draws the real subset and seeds the weights, batch order and augmentation; with and without synthetic images share
the subset, so gains are paired per-seed differences). The TSTR gap is AUC(real100) - AUC(syn_only).

Budget. ``budget: steps`` (default) gives every run the evaluator's number of optimiser steps (``classifier.epochs``
passes over the real train split), rounded to whole epochs of its own training set: 10 % of the real data is seen
about 10 times as often, and adding 4708 synthetic images does not buy extra steps, so a gain cannot come from longer
training alone. ``budget: epochs`` keeps ``classifier.epochs`` passes over every training set instead (10 % real
then trains 10 times fewer steps than 100 %, and +synthetic about 10 times more than 10 % alone).

The recipe is read from the ``classifier`` section of the same params file (every key but ``seed``, so the runs
cannot drift from the evaluator); this stage's own keys are in the ``utility`` section.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer

from pipeline.core.artifacts import atomic_outputs, load_npz, write_json, write_tsv
from pipeline.core.cli import PipelineError, params_option, read_keys, run_stage
from pipeline.core.data import CLASSES, real_images
from pipeline.evaluation.classifier import Recipe
from pipeline.evaluation.utility import (Budget, Regime, check_options, curve_rows, plan, run_regimes, summarise)
from pipeline.figures.charts import save_fraction_plot

SECTION = "utility"  # the params.yaml section this stage reads
RECIPE_SECTION = "classifier"  # ... and the evaluator's recipe, read from its section
EXTRA_PARAMS = {RECIPE_SECTION: tuple(Recipe.__dataclass_fields__)}  # params of other sections (declared in dvc.yaml)
app = typer.Typer(add_completion=False, help=__doc__)

Split = tuple[np.ndarray, np.ndarray]


def read_recipe(params: Path) -> Recipe:
    """The evaluator's recipe from the ``classifier`` section (every key but ``seed``), type-checked.

    Raises:
        PipelineError: the section lacks a recipe key, or a value has the wrong type.
    """
    return Recipe.from_params(read_keys(params, RECIPE_SECTION, Recipe, "utility"))


def load_cohort(samples: Path, train: Split) -> Split:
    """The label-matched synthetic cohort; it must match the real train split's image size and class counts."""
    path = samples / "cohort_matched.npz"
    z = load_npz(path, ("images", "labels"), "sample")
    images, labels = z["images"], z["labels"].astype(np.int64)
    counts, real_counts = np.bincount(labels, minlength=2), np.bincount(train[1], minlength=2)
    if images.shape[1:] != train[0].shape[1:] or images.dtype != np.uint8:
        raise PipelineError(f"{path} holds {images.dtype} images of {images.shape[1:]}, the real train split uint8 "
                            f"{train[0].shape[1:]}: rerun the sample stage on this prepared data")
    if len(counts) != 2 or not np.array_equal(counts, real_counts):
        raise PipelineError(f"{path} is not label-matched to the real train split ({counts.tolist()} vs "
                            f"{real_counts.tolist()} images per class {list(CLASSES)}): rerun the sample stage")
    return images, labels


def load_real_runs(path: Path, regimes: list[Regime], seeds: list[int]) -> dict[Regime, list[dict[str, float]]]:
    """The real-only runs of the ``utility_real`` stage; they must be of the same fractions, seeds and budget."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the utility_real stage first (dvc repro utility_real)")
    runs = json.loads(path.read_text())
    out = {}
    for regime in regimes:
        per_seed = runs.get("runs", {}).get(regime.name)
        if per_seed is None or [r["seed"] for r in per_seed] != list(seeds):
            raise PipelineError(f"{path} has no {regime.name} runs of seeds {seeds}: rerun the utility_real stage "
                                "(dvc repro utility_real)")
        out[regime] = per_seed
    return out


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared real data (output of prepare): train, val and test splits."),
    samples: Path = typer.Option(..., help="Samples folder (output of sample): cohort_matched.npz."),
    real_runs: Path = typer.Option(..., help="The real-only runs (output of utility_real)."),
    metrics: Path = typer.Option(..., help="Output JSON: test AUC/accuracy per regime (mean, std, per seed), TSTR "
                                           "gap, gains of synthetic images per real fraction, N and steps of each."),
    curve: Path = typer.Option(..., help="Output TSV for dvc plots: AUC/accuracy vs real fraction, ± synthetic."),
    figure: Path = typer.Option(..., help="Output PNG: AUC and accuracy vs real fraction, with error bars."),
    params: Path = params_option(),
    fractions: list[float] = typer.Option(..., help="Shares of the real train split (stratified); 1.0 is always "
                                          "run."),
    seeds: list[int] = typer.Option(..., help="One run per seed and regime: real subset, weights, batches."),
    synthetic_fraction: float = typer.Option(..., min=0.0, max=1.0, help="Share of the synthetic cohort added to real "
                                             "data (stratified); syn_only always uses all of it."),
    budget: Budget = typer.Option(..., help="Held fixed across training sets: 'steps' (the evaluator's optimiser "
                                  "steps) or 'epochs' (classifier.epochs passes)."),
) -> None:
    """Retrain the evaluator recipe (params section classifier, less seed) on synthetic and mixed training sets at
    several shares of the real train split; select on real val, test on real test; mean ± std over seeds; gains
    against the real-only runs of utility_real.

    Same budget (budget=steps, the default): every run makes the evaluator's number of optimiser steps
    (classifier.epochs passes over the full real train split), rounded to whole epochs of its own set, so small sets
    are seen more often and added synthetic images buy no extra steps. budget=epochs keeps classifier.epochs passes
    over every set instead (10 % real then trains 10x fewer steps than 100 %).
    """
    t0 = time.time()
    check_options(fractions, seeds, synthetic_fraction)
    recipe = read_recipe(params)
    real, val, test = (real_images(data, split) for split in ("train", "val", "test"))
    synthetic = load_cohort(samples, real)
    regimes = plan(fractions)
    mixed = [r for r in regimes if r.synthetic]
    results = load_real_runs(real_runs, [r for r in regimes if not r.synthetic], seeds)
    results |= run_regimes(mixed, seeds, real, val, test, synthetic, synthetic_fraction, recipe, budget)
    results = {r: results[r] for r in regimes}
    summary = summarise(results, seeds)
    out = {k: round(v, 6) if isinstance(v, float) else v for k, v in summary.items()}
    out.update({"n_real_train": len(real[1]), "n_synthetic": len(synthetic[1]), "n_val": len(val[1]),
                "n_test": len(test[1]), "n_seeds": len(seeds), "budget_steps": recipe.epochs * -(-len(real[1])
                                                                                                // recipe.batch_size),
                "wall_time_s": round(time.time() - t0, 1)})
    rows = curve_rows(summary, fractions)
    syn = {key: (summary[f"syn_only_{m}_mean"], summary[f"syn_only_{m}_std"]) for key, m in (("auc", "auc"),
                                                                                             ("acc", "accuracy"))}
    with atomic_outputs(metrics, curve, figure) as (tmp_metrics, tmp_curve, tmp_figure):
        write_json(tmp_metrics, out)
        write_tsv(tmp_curve, rows)
        save_fraction_plot(tmp_figure, rows, syn, f"evaluator recipe on real test, {len(seeds)} seed(s), mean ± std; "
                                                  f"budget: same {budget.value}")
    gains = [f"{r.name} {out[f'gain_{r.name}_auc_mean']:+.4f} ± {out[f'gain_{r.name}_auc_std']:.4f}"
             for r in regimes if r.real_fraction > 0 and not r.synthetic]
    typer.echo(f"utility: TSTR gap AUC {out['tstr_gap_auc_mean']:+.4f} ± {out['tstr_gap_auc_std']:.4f}; AUC gain of "
               f"synthetic images: {', '.join(gains)} -> {metrics}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
