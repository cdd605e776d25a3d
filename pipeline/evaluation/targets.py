"""The project's targets, each one figure of a stage's metrics file against a bound, and the small headline file
(``metrics/headline.json``) that holds exactly those figures, beside the detailed metrics files.

The bounds are the project's goals (README, "Results"; the issues that set them), not hyperparameters: they choose
nothing, so they live here and not in params.yaml.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

__all__ = ["Target", "TARGETS", "evaluate_targets", "headline"]


@dataclass(frozen=True)
class Target:
    """One target: ``metrics/<file>``'s ``key`` compared with ``bound`` by ``op`` (``<=``, ``>=``, ``==``)."""

    name: str
    file: str
    key: str
    op: str
    bound: float
    label: str
    fmt: str = ".3f"
    absolute: bool = False  # compare |value| (a difference that may have either sign)


TARGETS: tuple[Target, ...] = (
    Target("fid_vs_train", "fid.json", "fid_inception_vs_train_n4708", "<=", 10.0,
           "Inception FID of the label-matched cohort vs real train (N 4708); the 2025 thesis: 66.3", ".2f"),
    Target("fid_vs_test", "fid.json", "fid_inception_vs_test_n624", "<=", 30.0,
           "Inception FID vs real test (N 624; real train vs test: 23.6)", ".2f"),
    Target("recall", "fid.json", "recall_k5_inception_vs_train_n4708", ">=", 0.70, "recall (k 5) vs train"),
    Target("precision", "fid.json", "precision_k5_inception_vs_train_n4708", ">=", 0.85, "precision (k 5) vs train"),
    Target("label_fidelity", "fid.json", "label_fidelity_accuracy", ">=", 0.97,
           "label fidelity: the evaluator's accuracy on the cohort's requested labels"),
    Target("recon_fid", "autoencoder.json", "fid_recon_train_vs_train_n4708", "<=", 5.0,
           "autoencoder reconstruction FID (train, N 4708; the ceiling of any LDM on it)", ".2f"),
    Target("evaluator_auc", "classifier.json", "test_auc", ">=", 0.96, "evaluator test AUC"),
    Target("speedup", "sampling_speed.json", "speedup_vs_ddpm", ">=", 20.0, "DDIM speed-up over 1000-step DDPM",
           ".1f"),
    Target("tstr_gap", "utility.json", "tstr_gap_auc_mean", "<=", 0.02,
           "TSTR gap: AUC real only − synthetic only", ".4f"),
    Target("gain_real10", "utility.json", "gain_real10_auc_mean", ">=", 0.02,
           "AUC gain at 10 % real from adding the cohort", ".4f"),
    Target("near_copies", "privacy.json", "near_copies", "==", 0, "near-copies of training images", ".0f"),
    Target("msssim_normal", "privacy.json", "msssim_normal_diff", "<=", 0.05,
           "MS-SSIM synthetic − real, normal (diversity)", ".3f", absolute=True),
    Target("msssim_pneumonia", "privacy.json", "msssim_pneumonia_diff", "<=", 0.05,
           "MS-SSIM synthetic − real, pneumonia", ".3f", absolute=True),
    # counted on the sources the evaluator reads as their own label (#43): a flip it already saw unedited is no edit's
    Target("n2p_flip", "counterfactual.json", "n2p_readable_flip_rate", ">=", 0.90,
           "counterfactual flip, normal → pneumonia (sources read as normal)"),
    Target("n2p_ssim", "counterfactual.json", "n2p_readable_ssim", ">=", 0.85,
           "counterfactual SSIM, normal → pneumonia (sources read as normal)"),
    Target("p2n_flip", "counterfactual.json", "p2n_readable_flip_rate", ">=", 0.90,
           "counterfactual flip, pneumonia → normal (sources read as pneumonia)"),
    Target("p2n_ssim", "counterfactual.json", "p2n_readable_ssim", ">=", 0.85,
           "counterfactual SSIM, pneumonia → normal (sources read as pneumonia)"),
)

_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


def evaluate_targets(metrics: dict[str, dict[str, Any]],
                     targets: tuple[Target, ...] = TARGETS) -> list[dict[str, Any]]:
    """Each target with its measured value (None when its metrics file or key is absent) and whether it is met.

    Args:
        metrics: metrics file name (``fid.json``) -> its values.
        targets: the targets to read.
    """
    rows = []
    for t in targets:
        value = metrics.get(t.file, {}).get(t.key)
        met = None if value is None else bool(_OPS[t.op](abs(value) if t.absolute else value, t.bound))
        rows.append({"name": t.name, "label": t.label, "file": t.file, "key": t.key, "op": t.op, "bound": t.bound,
                     "value": value, "met": met, "fmt": t.fmt})
    return rows


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline metrics file: each target's value, and how many targets are met of those measured."""
    out: dict[str, Any] = {r["name"]: r["value"] for r in rows if r["value"] is not None}
    measured = [r for r in rows if r["met"] is not None]
    out["targets_met"] = sum(r["met"] for r in measured)
    out["targets_measured"] = len(measured)
    return out
