"""Stage ``fid`` (compute FID): standard Inception FID of the sampled label-matched cohort against the real images.

Every value names its reference set and its N in the key (FID depends strongly on N; compare only at equal N):
``fid_inception_vs_train_n4708`` is the whole cohort against the whole train split; ``..._vs_test_n624`` takes, from
the cohort, the first images of each class in the test split's class counts. Per-class values compare one class of
the cohort with the same class of the reference. Reads the ``fid`` section of params.yaml.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from pipeline.artifacts import atomic_outputs, write_json
from pipeline.cli import params_option, run_stage
from pipeline.data import CLASSES
from pipeline.fid import fid_from_features, inception_features

SECTION = "fid"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


def matched_subset(labels: np.ndarray, ref_labels: np.ndarray) -> np.ndarray:
    """Indices of the first images of each class of ``labels`` in the class counts of ``ref_labels``."""
    return np.concatenate([np.flatnonzero(labels == k)[:(ref_labels == k).sum()] for k in range(len(CLASSES))])


def fid_table(feats: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray,
              name: str) -> dict[str, float]:
    """Overall and per-class FID of (feats, labels) against (ref, ref_labels); N of each side in the keys."""
    out = {f"fid_inception_vs_{name}_n{len(ref)}": fid_from_features(feats, ref)}
    for k, cls in enumerate(CLASSES):
        a, b = feats[labels == k], ref[ref_labels == k]
        out[f"fid_inception_{cls}_vs_{name}_{cls}_n{len(b)}"] = fid_from_features(a, b)
    return {k: round(v, 3) for k, v in out.items()}


@app.command()
def main(
    samples: Path = typer.Option(..., help="Samples folder (output of sample)."),
    fid_ref: Path = typer.Option(..., help="Real-image Inception features (output of fid_ref)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    params: Path = params_option(),
    batch_size: int = typer.Option(50, min=1, help="Images per Inception forward pass (no effect on results)."),
) -> None:
    """Inception FID of the label-matched cohort vs real train and real test, overall and per class."""
    t0 = time.time()
    with np.load(samples / "cohort_matched.npz") as z:
        images, labels = z["images"], z["labels"]
    feats = inception_features(images, batch_size, desc="inception samples")
    out: dict[str, float] = {}
    for split in ("train", "test"):
        with np.load(fid_ref / f"{split}.npz") as z:
            ref, ref_labels = z["features"], z["labels"]
        idx = matched_subset(labels, ref_labels)
        out.update(fid_table(feats[idx], labels[idx], ref, ref_labels, split))
    out["wall_time_s"] = round(time.time() - t0, 1)
    with atomic_outputs(metrics) as (tmp,):
        write_json(tmp, out)
    typer.echo(" ".join(f"{k}={v}" for k, v in out.items()), err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
