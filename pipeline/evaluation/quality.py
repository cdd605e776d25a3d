"""Sample-quality metrics on feature vectors beside FID (:mod:`pipeline.evaluation.fid`): KID,
precision/recall/density/coverage, and the tables of the ``fid`` stage (overall and per-class FID, KID and PRDC, label
fidelity).

- KID (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018): unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (xᵀy / d + 1)³, averaged over random subsets; unlike FID it is unbiased in N, so small N is comparable.
  The kernel and estimator are torchmetrics' (``poly_mmd``), the same code as its ``KernelInceptionDistance``.
- Precision, recall, density, coverage (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models",
  ICML 2020) through the authors' ``prdc`` package: fidelity (are samples inside the real manifold?) and diversity
  (is the real manifold covered?) as separate numbers, with k nearest neighbours.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
from prdc import compute_prdc
from torchmetrics.image.kid import poly_mmd

from pipeline.core.data import CLASSES
from pipeline.evaluation.classifier import binary_metrics
from pipeline.evaluation.fid import fid_from_features

__all__ = ["kid", "prdc", "matched_subset", "fid_table", "kid_prdc_table", "label_fidelity"]


def kid(a: np.ndarray, b: np.ndarray, subset_size: int = 1000, n_subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance between feature sets ``a`` (N×D) and ``b`` (M×D): mean and std over subsets.

    Args:
        a: features of one set (e.g. generated images).
        b: features of the other set (e.g. real images).
        subset_size: images per subset from each side; capped at min(N, M).
        n_subsets: number of random subset pairs.
        seed: seed of the subset draws.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    ta, tb = torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))
    values = [poly_mmd(tb[rng.choice(len(b), m, replace=False)], ta[rng.choice(len(a), m, replace=False)]).item()
              for _ in range(n_subsets)]
    return float(np.mean(values)), float(np.std(values))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features with ``k`` neighbours."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} vectors per set, got {len(real)} and {len(fake)}")
    with contextlib.redirect_stdout(sys.stderr):  # the package prints the set sizes
        out = compute_prdc(np.asarray(real, np.float32), np.asarray(fake, np.float32), nearest_k=k)
    return {key: float(v) for key, v in out.items()}


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
