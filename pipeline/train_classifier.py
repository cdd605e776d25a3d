"""Stage ``train_classifier``: the evaluator, a pneumonia-vs-normal classifier trained on the real train split.

The epoch (best validation AUC of the EMA weights) and the decision threshold (Youden's J) are chosen on the
validation split; the test split is only reported. The recipe is :func:`pipeline.evaluation.classifier.train_evaluator`, shared
with every stage that retrains it on other data. Reads the ``classifier`` section of params.yaml.

Anchors (MedMNIST v2, Yang et al., Scientific Data 2023, PneumoniaMNIST test): ResNet-18 (28) AUC 0.944 / ACC 0.854,
ResNet-50 (224) AUC 0.962 / ACC 0.884.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, write_json, write_tsv
from pipeline.core.cli import params_option, run_stage
from pipeline.core.data import real_images
from pipeline.evaluation.classifier import Recipe, report, save_classifier, train_evaluator

SECTION = "classifier"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (output of prepare)."),
    out: Path = typer.Option(..., help="Output model folder (model.safetensors + config.json)."),
    metrics: Path = typer.Option(..., help="Output JSON: test/val AUC, accuracy, sensitivity, specificity; threshold."),
    curve: Path = typer.Option(..., help="Output TSV of per-epoch train loss and val AUC for dvc plots."),
    params: Path = params_option(),
    widths: list[int] = typer.Option(..., help="Channels of the four ResNet stages."),
    blocks: list[int] = typer.Option(..., help="Basic residual blocks in each of the four stages."),
    input_size: int = typer.Option(..., min=8, help="Images are resized (bilinear) to this size for the network."),
    epochs: int = typer.Option(..., min=1, help="Training epochs over the train split."),
    batch_size: int = typer.Option(..., min=1, help="Batch size."),
    lr: float = typer.Option(..., min=0.0, help="Peak learning rate (one-cycle cosine schedule, AdamW)."),
    weight_decay: float = typer.Option(..., min=0.0, help="AdamW weight decay."),
    label_smoothing: float = typer.Option(..., min=0.0, max=1.0, help="Targets y(1-s) + s/2."),
    class_balance: bool = typer.Option(..., help="Weight each class's loss by N / (2 N_class)."),
    rotation: float = typer.Option(..., min=0.0, help="Augmentation: maximum rotation, degrees."),
    translation: float = typer.Option(..., min=0.0, help="Augmentation: maximum shift, fraction of the image."),
    scale: float = typer.Option(..., min=0.0, max=0.9, help="Augmentation: maximum zoom, 1 ± scale."),
    intensity: float = typer.Option(..., min=0.0, help="Augmentation: maximum contrast 1 ± x and brightness ± x."),
    ema_decay: float = typer.Option(..., min=0.0, max=0.9999, help="EMA decay of the evaluated weights; 0 = off."),
    seed: int = typer.Option(..., help="Seed for weights, batch order and augmentation."),
) -> None:
    """Train the evaluator; write its model folder, test/val metrics and a per-epoch curve."""
    t0 = time.time()
    splits = {split: real_images(data, split) for split in ("train", "val", "test")}
    recipe = Recipe(widths=widths, blocks=blocks, input_size=input_size, epochs=epochs,
                    batch_size=batch_size, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing,
                    class_balance=class_balance, rotation=rotation, translation=translation, scale=scale,
                    intensity=intensity, ema_decay=ema_decay)
    evaluator, history, threshold = train_evaluator(*splits["train"], *splits["val"], recipe, seed=seed)
    scores = report(evaluator, {"test": splits["test"], "val": splits["val"]})
    best_epoch = max(history, key=lambda r: r["val_auc"])["epoch"]
    with atomic_outputs(out, metrics, curve) as (tmp_out, tmp_metrics, tmp_curve):
        save_classifier(tmp_out, evaluator, "train_classifier", best_epoch=best_epoch, trained_on="real train split",
                        threshold_rule="Youden's J on val")
        write_tsv(tmp_curve, history)
        write_json(tmp_metrics, {**scores, "threshold": round(threshold, 6), "best_epoch": best_epoch,
                                 "epochs": epochs, "wall_time_s": round(time.time() - t0, 1)})
    typer.echo(f"classifier: test AUC {scores['test_auc']:.4f}, accuracy {scores['test_accuracy']:.4f} "
               f"(val AUC {scores['val_auc']:.4f}, threshold {threshold:.3f}) -> {out}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
