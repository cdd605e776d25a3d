"""Scores of counterfactual edits: how often the evaluator calls an edit the target class (flip rate), and how much of
the source it keeps (SSIM, PSNR, L1), per direction, for a strength sweep and for the guide of guided edits."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from pipeline.core.cli import PipelineError
from pipeline.core.data import CLASSES
from pipeline.evaluation.classifier import Evaluator

__all__ = ["DIRECTIONS", "ARROWS", "PSNR_CAP_DB", "select_sources", "similarity", "flips_to", "edit_scores",
           "direction_scores", "readable_scores", "sweep_scores", "guide_scores", "panel_rows"]

PSNR_CAP_DB = 100.0
"""PSNR of identical images is infinite; JSON metrics must be finite, so per-image PSNR is capped here."""

DIRECTIONS = {"n2p": (0, 1), "p2n": (1, 0)}
"""Direction key -> (source label, target label)."""
ARROWS = {"n2p": "normal→pneumonia", "p2n": "pneumonia→normal"}


def select_sources(labels: np.ndarray, n_per_class: int | None, seed: int, split: str = "test") -> np.ndarray:
    """Indices of ``n_per_class`` images of each class (all when None), a seeded subset, normals first.

    Raises:
        PipelineError: a class has fewer images than asked for.
    """
    rng = np.random.default_rng(seed)
    out = []
    for k, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == k)
        if n_per_class is not None and n_per_class > len(idx):
            raise PipelineError(f"counterfactual.n_per_class is {n_per_class}, but the {split} split has only "
                                f"{len(idx)} {name} images; lower it, or set it to null for all of them")
        out.append(np.sort(rng.choice(idx, n_per_class, replace=False)) if n_per_class is not None else idx)
    return np.concatenate(out)


def similarity(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image SSIM (11×11 Gaussian window, σ 1.5), PSNR (dB, capped at :data:`PSNR_CAP_DB`) and L1 (mean absolute
    difference) of two uint8 N×H×W image sets, in [0, 1] units (Wang et al., IEEE TIP 2004)."""
    x = torch.from_numpy(a).double().div(255.0)[:, None]
    y = torch.from_numpy(b).double().div(255.0)[:, None]
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    mse = (x - y).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10))))
    return {"ssim": ssim.numpy(), "psnr_db": psnr.numpy(), "l1": (x - y).abs().flatten(1).mean(1).numpy()}


def flips_to(prob: np.ndarray, threshold: float, target: np.ndarray) -> np.ndarray:
    """Whether the evaluator's call (pneumonia when ``prob >= threshold``) equals the target label, per image."""
    return (prob >= threshold).astype(np.int64) == target


def edit_scores(sources: np.ndarray, edits: np.ndarray, target: np.ndarray,
                evaluator: Evaluator) -> dict[str, float]:
    """Flip rate to ``target`` and mean SSIM / PSNR / L1 of ``edits`` against ``sources`` (one direction)."""
    sim = similarity(edits, sources)
    flips = flips_to(evaluator.predict_proba(edits), evaluator.threshold, target)
    return {"flip_rate": float(flips.mean()), **{k: float(v.mean()) for k, v in sim.items()}}


def direction_scores(sources: np.ndarray, source_labels: np.ndarray, edits: np.ndarray, backs: np.ndarray,
                     nulls: np.ndarray, evaluator: Evaluator) -> dict[str, float]:
    """``<dir>_{n, flip_rate, ssim, psnr_db, l1, reversibility_ssim, composition_ssim}`` for both directions."""
    out: dict[str, float] = {}
    for d, (src, tgt) in DIRECTIONS.items():
        m = source_labels == src
        scores = edit_scores(sources[m], edits[m], np.full(m.sum(), tgt), evaluator)
        scores["reversibility_ssim"] = float(similarity(backs[m], sources[m])["ssim"].mean())
        scores["composition_ssim"] = float(similarity(nulls[m], sources[m])["ssim"].mean())
        out.update({f"{d}_n": int(m.sum()), **{f"{d}_{k}": round(v, 5) for k, v in scores.items()}})
    return out


def readable_scores(sources: np.ndarray, source_labels: np.ndarray, edits: np.ndarray, p_source: np.ndarray,
                    p_edit: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """The edits of the sources the evaluator reads as their own label, counted apart (issue #43): an edit cannot be
    credited with a flip the evaluator already saw in the unedited source (with no edit at all it calls 14 % of the
    normal test sources pneumonia). Per direction: ``<dir>_readable_n``, ``<dir>_excluded_share`` (sources it reads
    as the other class, left out), and ``<dir>_readable_flip_rate`` / ``_readable_ssim`` on the rest (None when no
    source is left)."""
    out: dict[str, float | int | None] = {}
    own = flips_to(p_source, threshold, source_labels)
    for d, (src, tgt) in DIRECTIONS.items():
        m = source_labels == src
        r = m & own
        out[f"{d}_readable_n"] = int(r.sum())
        out[f"{d}_excluded_share"] = round(1.0 - float(r.sum()) / max(int(m.sum()), 1), 5)
        if r.any():  # the evaluator's probabilities on the edits are the stage's own, not predicted again
            flips = flips_to(p_edit[r], threshold, np.full(r.sum(), tgt))
            out[f"{d}_readable_flip_rate"] = round(float(flips.mean()), 5)
            out[f"{d}_readable_ssim"] = round(float(similarity(edits[r], sources[r])["ssim"].mean()), 5)
        else:
            out[f"{d}_readable_flip_rate"] = out[f"{d}_readable_ssim"] = None
    return out


def sweep_scores(sources: np.ndarray, source_labels: np.ndarray, edits_at: dict[float, np.ndarray],
                 evaluator: Evaluator) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Metrics ``sweep_t<s>_<dir>_<measure>`` and TSV rows (strength, flip and SSIM per direction) of the sweep."""
    keys, rows = {}, []
    for s, edits in edits_at.items():
        row: dict[str, float] = {"strength": s}
        for d, (src, tgt) in DIRECTIONS.items():
            m = source_labels == src
            scores = edit_scores(sources[m], edits[m], np.full(m.sum(), tgt), evaluator)
            keys.update({f"sweep_t{s:g}_{d}_{k}": round(v, 5) for k, v in scores.items()})
            row.update({f"flip_{d}": round(scores["flip_rate"], 5), f"ssim_{d}": round(scores["ssim"], 5)})
        rows.append(row)
    return keys, rows


def guide_scores(source_labels: np.ndarray, edits: np.ndarray, strengths: np.ndarray, evaluator: Evaluator,
                 guide: Evaluator) -> dict[str, float]:
    """Per direction, of guided edits: mean and largest strength, and the guide's own flip rate (its plain call) and
    its agreement with the evaluator on the edits (each at its own threshold)."""
    out: dict[str, float] = {}
    p_guide, p_eval = guide.predict_proba(edits), evaluator.predict_proba(edits)
    for d, (src, tgt) in DIRECTIONS.items():
        m = source_labels == src
        out[f"{d}_strength_max"] = round(float(strengths[m].max()), 5)
        out[f"{d}_guide_flip_rate"] = round(float(flips_to(p_guide[m], guide.threshold, np.full(m.sum(), tgt)).mean()),
                                            5)
        out[f"{d}_guide_agreement"] = round(float(((p_guide[m] >= guide.threshold)
                                                   == (p_eval[m] >= evaluator.threshold)).mean()), 5)
    return out


def panel_rows(source_labels: np.ndarray, test_index: np.ndarray, p_source: np.ndarray, p_edit: np.ndarray,
               strengths: np.ndarray, n: int, threshold: float | None = None) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` images of each direction, and their row labels (direction, test index, strength,
    P(pneumonia)). With the evaluator's ``threshold``, drawn from the sources it reads as their own label (all of the
    direction's sources where none is)."""
    idx, labels = [], []
    own = (flips_to(p_source, threshold, source_labels) if threshold is not None
           else np.ones(len(source_labels), dtype=bool))
    for d, (src, _) in DIRECTIONS.items():
        pool = np.flatnonzero((source_labels == src) & own)
        for i in (pool if len(pool) else np.flatnonzero(source_labels == src))[:n]:
            idx.append(i)
            labels.append(f"{ARROWS[d]}\ntest #{test_index[i]}, t0 {strengths[i]:g}\n"
                          f"P(pn) {p_source[i]:.2f}→{p_edit[i]:.2f}")
    return np.asarray(idx, dtype=np.int64), labels
