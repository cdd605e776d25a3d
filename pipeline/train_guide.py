"""Stage ``train_guide``: a second pneumonia-vs-normal classifier, the guide that stops guided counterfactual edits.

The counterfactual stage's ``strength_rule: guided`` edits each image at the smallest strength whose edit this guide
calls the target class (:func:`pipeline.diffusion.edit.edit_guided`), so that an easy image is changed less than a hard one.
The edits are then judged by the *evaluator* (``train_classifier``), never by the guide: the guide is another model,
trained on the same real train split with its own architecture and seed, so that the flip rate the stage reports is
not the guide's own verdict. How often the two agree is written to the metrics (on real test images, and in the
counterfactual stage on the edits).

The recipe (epochs, optimiser, augmentation, EMA, val-based epoch and Youden threshold) is the evaluator's, read from
the ``classifier`` section; this stage's own ``guide`` section sets the network's widths, blocks and the seed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import typer

from pipeline.core.artifacts import atomic_outputs, write_json, write_tsv
from pipeline.core.cli import PipelineError, params_option, read_keys, run_stage
from pipeline.core.data import real_images
from pipeline.evaluation.classifier import Recipe, load_classifier, report, save_classifier, train_evaluator

SECTION = "guide"  # the params.yaml section this stage reads
RECIPE_SECTION = "classifier"  # ... and the evaluator's recipe, read from its section
OWN_KEYS = ("widths", "blocks", "seed")  # the guide's own, in its section
EXTRA_PARAMS = {RECIPE_SECTION: tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in OWN_KEYS)}
app = typer.Typer(add_completion=False, help=__doc__)


def read_recipe(params: Path, widths: list[int], blocks: list[int]) -> Recipe:
    """The evaluator's recipe from the ``classifier`` section, with the guide's own network widths and blocks.

    Raises:
        PipelineError: the section lacks a recipe key, or a value has the wrong type.
    """
    values = read_keys(params, RECIPE_SECTION, Recipe, "train_guide", EXTRA_PARAMS[RECIPE_SECTION])
    return Recipe.from_params({**values, "widths": widths, "blocks": blocks})


def agreement(a: np.ndarray, threshold_a: float, b: np.ndarray, threshold_b: float) -> float:
    """Share of images two classifiers call the same class, each at its own threshold (P(pneumonia) arrays)."""
    if a.shape != b.shape:
        raise ValueError(f"probability arrays differ in shape: {a.shape} vs {b.shape}")
    return float(((a >= threshold_a) == (b >= threshold_b)).mean())


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (output of prepare)."),
    classifier: Path = typer.Option(..., help="The evaluator's model folder: the guide's agreement with it is "
                                    "reported."),
    out: Path = typer.Option(..., help="Output model folder (model.safetensors + config.json)."),
    metrics: Path = typer.Option(..., help="Output JSON: test/val AUC, accuracy, threshold, agreement with the "
                                 "evaluator."),
    curve: Path = typer.Option(..., help="Output TSV of per-epoch train loss and val AUC."),
    params: Path = params_option(),
    widths: list[int] = typer.Option(..., help="Channels of the guide's four ResNet stages (the "
                                     "evaluator's are 16-128: another network)."),
    blocks: list[int] = typer.Option(..., help="Basic residual blocks in each of the four stages."),
    seed: int = typer.Option(..., help="Seed for weights, batch order and augmentation (the evaluator's is another)."),
) -> None:
    """Train the guide; write its model folder, test/val metrics, agreement with the evaluator and a curve."""
    t0 = time.time()
    recipe = read_recipe(params, widths, blocks)
    splits = {split: real_images(data, split) for split in ("train", "val", "test")}
    evaluator = load_classifier(classifier)
    if evaluator.size != splits["test"][0].shape[-1]:
        raise PipelineError(f"the evaluator at {classifier} takes {evaluator.size}-px images, the data are "
                            f"{splits['test'][0].shape[-1]} px: retrain it (dvc repro train_classifier)")
    guide, history, threshold = train_evaluator(*splits["train"], *splits["val"], recipe, seed=seed)
    scores = report(guide, {"test": splits["test"], "val": splits["val"]})
    for split in ("test", "val"):
        images = splits[split][0]
        scores[f"{split}_agreement_with_evaluator"] = round(agreement(
            guide.predict_proba(images), guide.threshold, evaluator.predict_proba(images), evaluator.threshold), 6)
    best_epoch = max(history, key=lambda r: r["val_auc"])["epoch"]
    with atomic_outputs(out, metrics, curve) as (tmp_out, tmp_metrics, tmp_curve):
        save_classifier(tmp_out, guide, "train_guide", best_epoch=best_epoch, trained_on="real train split",
                        threshold_rule="Youden's J on val", role="guide of guided counterfactual edits")
        write_tsv(tmp_curve, history)
        write_json(tmp_metrics, {**scores, "threshold": round(threshold, 6), "best_epoch": best_epoch,
                                 "epochs": recipe.epochs, "seed": seed, "wall_time_s": round(time.time() - t0, 1)})
    typer.echo(f"guide: test AUC {scores['test_auc']:.4f}, agreement with the evaluator on test "
               f"{scores['test_agreement_with_evaluator']:.3f} (threshold {threshold:.3f}) -> {out}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
