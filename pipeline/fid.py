"""Stage ``fid`` (compute FID): how close the sampled label-matched cohort is to real images, by several measures.

Every value names its feature space, its reference set and its N in the key (FID depends strongly on N; compare only
at equal N): ``fid_inception_vs_train_n4708`` is the whole cohort against the whole train split; ``..._vs_test_n624``
takes, from the cohort, the first images of each class in the test split's class counts.

- Inception FID (standard weights, protocol of :mod:`pipeline.evaluation.fid`), overall and per class, vs train and vs test.
- KID mean and std over random subsets (:func:`pipeline.evaluation.quality.kid`), vs train and vs test.
- Precision, recall, density, coverage with k nearest neighbours on Inception features (:func:`pipeline.evaluation.quality.prdc`).
- Domain FID: the same Fréchet distance on the evaluator classifier's penultimate features, vs train and vs test.
- Label fidelity: the evaluator's accuracy (at its val-chosen threshold) and AUC on the cohort, against the labels
  the images were sampled for.
- ``fid_inception_real_train_vs_real_test_n624``: the real-vs-real figure at the same N, the floor to compare with.

The cohort's Inception features are written out for later stages (privacy, utility). Reads the ``fid`` section.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, load_npz, save_npz, write_json
from pipeline.core.cli import params_option, run_stage
from pipeline.core.data import real_images
from pipeline.evaluation.classifier import load_classifier
from pipeline.evaluation.fid import fid_from_features, inception_features
from pipeline.evaluation.quality import fid_table, kid_prdc_table, label_fidelity, matched_subset

SECTION = "fid"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    samples: Path = typer.Option(..., help="Samples folder (output of sample)."),
    fid_ref: Path = typer.Option(..., help="Real-image Inception features (output of fid_ref)."),
    data: Path = typer.Option(..., help="Prepared real data (for the evaluator's features of real images)."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    features: Path = typer.Option(..., help="Output npz of the cohort's Inception features (with labels)."),
    params: Path = params_option(),
    batch_size: int = typer.Option(..., min=1, help="Images per Inception forward pass (no effect on results)."),
    kid_subset_size: int = typer.Option(..., min=2, help="Images per KID subset (capped at the smaller set)."),
    kid_subsets: int = typer.Option(..., min=1, help="Number of KID subsets."),
    prdc_k: int = typer.Option(..., min=1, help="Nearest neighbours k of precision/recall/density/coverage."),
    seed: int = typer.Option(..., help="Seed of the KID subset draws."),
) -> None:
    """FID, KID, PRDC, domain FID and label fidelity of the label-matched cohort vs real train and real test."""
    t0 = time.time()
    cohort = load_npz(samples / "cohort_matched.npz", ("images", "labels"), "sample")
    images, labels = cohort["images"], cohort["labels"]
    feats = inception_features(images, batch_size, desc="inception samples")
    evaluator = load_classifier(classifier)
    out: dict[str, float] = label_fidelity(evaluator.predict_proba(images), labels, evaluator.threshold)
    domain = evaluator.features(images)
    refs = {split: load_npz(fid_ref / f"{split}.npz", ("features", "labels"), "fid_ref") for split in ("train", "test")}
    for split, ref in refs.items():
        idx = matched_subset(labels, ref["labels"])
        out.update(fid_table(feats[idx], labels[idx], ref["features"], ref["labels"], split))
        out.update(kid_prdc_table(feats[idx], ref["features"], split, kid_subset_size, kid_subsets, prdc_k, seed))
        real, real_labels = real_images(data, split)
        out.update(fid_table(domain[idx], labels[idx], evaluator.features(real), real_labels, split, "domain"))
    out[f"fid_inception_real_train_vs_real_test_n{len(refs['test']['labels'])}"] = fid_from_features(
        refs["test"]["features"], refs["train"]["features"])
    out = {k: round(v, 5) for k, v in out.items()}
    out["wall_time_s"] = round(time.time() - t0, 1)
    with atomic_outputs(metrics, features) as (tmp, tmp_features):
        write_json(tmp, out)
        save_npz(tmp_features, features=feats, labels=labels)
    typer.echo(" ".join(f"{k}={v}" for k, v in out.items()), err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
