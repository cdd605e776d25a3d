"""Stage ``fid`` (compute FID): how close the sampled label-matched cohort is to real images, by several measures.

Every value names its feature space, its reference set and its N in the key (FID depends strongly on N; compare only
at equal N): ``fid_inception_vs_train_n4708`` is the whole cohort against the whole train split; ``..._vs_test_n624``
takes, from the cohort, the first images of each class in the test split's class counts.

- Inception FID (standard weights, protocol of :mod:`pipeline.fid`), overall and per class, vs train and vs test.
- KID mean and std over random subsets (:func:`pipeline.quality.kid`), vs train and vs test.
- Precision, recall, density, coverage with k nearest neighbours on Inception features (:func:`pipeline.quality.prdc`).
- Domain FID: the same Fréchet distance on the evaluator classifier's penultimate features, vs train and vs test.
- Label fidelity: the evaluator's accuracy (at its val-chosen threshold) and AUC on the cohort, against the labels
  the images were sampled for.
- ``fid_inception_real_train_vs_real_test_n624``: the real-vs-real figure at the same N, the floor to compare with.

The cohort's Inception features are written out for later stages (privacy, utility). Reads the ``fid`` section.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from pipeline.artifacts import atomic_outputs, save_npz, write_json
from pipeline.classifier import binary_metrics, load_classifier
from pipeline.cli import PipelineError, params_option, run_stage
from pipeline.data import CLASSES
from pipeline.fid import fid_from_features, inception_features
from pipeline.fid_ref import real_uint8
from pipeline.quality import kid, prdc

SECTION = "fid"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


def matched_subset(labels: np.ndarray, ref_labels: np.ndarray) -> np.ndarray:
    """Indices of the first images of each class of ``labels`` in the class counts of ``ref_labels``."""
    return np.concatenate([np.flatnonzero(labels == k)[:(ref_labels == k).sum()] for k in range(len(CLASSES))])


def fid_table(feats: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray, name: str,
              space: str = "inception") -> dict[str, float]:
    """Overall and per-class FID of (feats, labels) against (ref, ref_labels); N of the reference in the keys."""
    out = {f"fid_{space}_vs_{name}_n{len(ref)}": fid_from_features(feats, ref)}
    for k, cls in enumerate(CLASSES):
        a, b = feats[labels == k], ref[ref_labels == k]
        out[f"fid_{space}_{cls}_vs_{name}_{cls}_n{len(b)}"] = fid_from_features(a, b)
    return out


def kid_prdc_table(feats: np.ndarray, ref: np.ndarray, name: str, subset_size: int, n_subsets: int, k: int,
                   seed: int) -> dict[str, float]:
    """KID (mean, std) and precision/recall/density/coverage of ``feats`` against ``ref``."""
    mean, std = kid(feats, ref, subset_size, n_subsets, seed)
    out = {f"kid_inception_vs_{name}_n{len(ref)}_mean": mean, f"kid_inception_vs_{name}_n{len(ref)}_std": std}
    out.update({f"{m}_k{k}_inception_vs_{name}_n{len(ref)}": v for m, v in prdc(ref, feats, k).items()})
    return out


def label_fidelity(prob: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """The evaluator's accuracy and AUC on synthetic images against the labels they were sampled for."""
    m = binary_metrics(prob, labels, threshold)
    return {f"label_fidelity_{k}": m[k] for k in ("accuracy", "auc", "sensitivity", "specificity")}


def _load_ref(path: Path) -> dict[str, np.ndarray]:
    """The reference features and labels of one split, read once (an open ``.npz`` re-reads its zip per access)."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the fid_ref stage first")
    with np.load(path) as z:
        return {"features": z["features"], "labels": z["labels"]}


@app.command()
def main(
    samples: Path = typer.Option(..., help="Samples folder (output of sample)."),
    fid_ref: Path = typer.Option(..., help="Real-image Inception features (output of fid_ref)."),
    data: Path = typer.Option(..., help="Prepared real data (for the evaluator's features of real images)."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    features: Path = typer.Option(..., help="Output npz of the cohort's Inception features (with labels)."),
    params: Path = params_option(),
    batch_size: int = typer.Option(50, min=1, help="Images per Inception forward pass (no effect on results)."),
    kid_subset_size: int = typer.Option(1000, min=2, help="Images per KID subset (capped at the smaller set)."),
    kid_subsets: int = typer.Option(100, min=1, help="Number of KID subsets."),
    prdc_k: int = typer.Option(5, min=1, help="Nearest neighbours k of precision/recall/density/coverage."),
    seed: int = typer.Option(0, help="Seed of the KID subset draws."),
) -> None:
    """FID, KID, PRDC, domain FID and label fidelity of the label-matched cohort vs real train and real test."""
    t0 = time.time()
    with np.load(samples / "cohort_matched.npz") as z:
        images, labels = z["images"], z["labels"]
    feats = inception_features(images, batch_size, desc="inception samples")
    evaluator = load_classifier(classifier)
    out: dict[str, float] = label_fidelity(evaluator.predict_proba(images), labels, evaluator.threshold)
    domain = evaluator.features(images)
    refs = {split: _load_ref(fid_ref / f"{split}.npz") for split in ("train", "test")}
    for split, ref in refs.items():
        idx = matched_subset(labels, ref["labels"])
        out.update(fid_table(feats[idx], labels[idx], ref["features"], ref["labels"], split))
        out.update(kid_prdc_table(feats[idx], ref["features"], split, kid_subset_size, kid_subsets, prdc_k, seed))
        real, real_labels = real_uint8(data, split)
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
