"""Train-on-synthetic and low-data utility: stratified subsets, the run plan and its training budget, seed
statistics and the metrics. Pure functions of arrays and numbers; the ``utility`` stage does the I/O and the
training."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.core.cli import PipelineError
from pipeline.core.runtime import parallel_map
from pipeline.evaluation.classifier import Recipe, binary_metrics, train_evaluator

__all__ = ["Budget", "UtilityPlan", "training_set", "train_and_test", "run_regimes", "check_options", "Regime", "plan", "stratified_subset", "epochs_for_budget", "mean_std", "summarise", "curve_rows",
           "SYNTHETIC_ONLY"]

SYNTHETIC_ONLY = "syn_only"
Split = tuple[np.ndarray, np.ndarray]


class Budget(str, enum.Enum):
    """What "the same training budget" holds fixed across training sets."""

    steps = "steps"
    epochs = "epochs"


@dataclass(frozen=True)
class UtilityPlan:
    """The keys of the ``utility`` params section that both utility stages read (``utility_real`` trains the real-only
    regimes, ``utility`` the ones with synthetic images)."""

    fractions: list[float]
    seeds: list[int]
    budget: Budget


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted) of a seeded, class-stratified subset: ``round(fraction * n_c)`` images of each class c (at
    least one of each class present).

    Each class is shuffled by its own stream (``default_rng([seed, c])``) and the first images are kept, so for one
    seed a smaller fraction's subset lies inside a larger one's (the 10 % set is part of the 25 % set): the curve over
    fractions adds data, it does not redraw it.

    Args:
        labels: class labels, N (integers >= 0).
        fraction: share of each class kept, in (0, 1].
        seed: subset seed.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, int(c)]).permutation(members)
        keep.append(order[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Regime:
    """One training set: a fraction of the real train split (0 for none), with or without the synthetic images."""

    real_fraction: float
    synthetic: bool

    @property
    def name(self) -> str:
        """Metrics-key prefix: ``syn_only``, ``real10``, ``real10_syn``, ``real12p5`` (no dots: DVC splits on them)."""
        if self.real_fraction == 0:
            return SYNTHETIC_ONLY
        pct = f"{100 * self.real_fraction:g}".replace(".", "p")
        return f"real{pct}" + ("_syn" if self.synthetic else "")


def plan(fractions: Sequence[float]) -> list[Regime]:
    """The regimes to train: synthetic only, then each real fraction (1.0 always: the train-on-real baseline) without
    and with synthetic images; the full split without synthetic is the real-only baseline, trained once."""
    fracs = sorted(set(float(f) for f in fractions) | {1.0})
    return [Regime(0.0, True)] + [Regime(f, s) for f in fracs for s in (False, True)]


def epochs_for_budget(n_train: int, batch_size: int, budget_steps: int) -> int:
    """Whole epochs over ``n_train`` images whose optimiser steps come closest to ``budget_steps`` (at least 1)."""
    steps_per_epoch = -(-n_train // batch_size)
    return max(1, round(budget_steps / steps_per_epoch))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _stats(prefix: str, per_seed: Sequence[float], seeds: Sequence[int]) -> dict[str, float]:
    mean, std = mean_std(per_seed)
    out = {f"{prefix}_mean": mean, f"{prefix}_std": std}
    out.update({f"{prefix}_seed{s}": float(v) for s, v in zip(seeds, per_seed)})
    return out


def summarise(results: dict[Regime, list[dict[str, float]]], seeds: Sequence[int],
              metrics: Sequence[str] = ("auc", "accuracy")) -> dict[str, float]:
    """Flat metrics: per regime the mean, std and per-seed values of each test metric, the TSTR gap (real-only minus
    synthetic-only) and the gain of adding synthetic images at each fraction, as paired per-seed differences.

    Args:
        results: regime -> one dict per seed (in ``seeds`` order) with the test metrics, ``n_train``, ``steps`` and
            optionally ``wall_time_s`` (summed over seeds).
        seeds: the seeds, for the key names.
        metrics: test metrics to report.
    """
    out: dict[str, float] = {}
    for regime, runs in results.items():
        out[f"{regime.name}_n_train"] = int(runs[0]["n_train"])
        out[f"{regime.name}_steps"] = int(runs[0]["steps"])
        out[f"{regime.name}_wall_time_s"] = round(sum(r.get("wall_time_s", 0.0) for r in runs), 1)
        for m in metrics:
            out.update(_stats(f"{regime.name}_{m}", [r[m] for r in runs], seeds))
    by_name = {r.name: runs for r, runs in results.items()}
    for m in metrics:
        diff = [a[m] - b[m] for a, b in zip(by_name["real100"], by_name[SYNTHETIC_ONLY])]
        out[f"tstr_gap_{m}_mean"], out[f"tstr_gap_{m}_std"] = mean_std(diff)
    for regime in results:
        if regime.synthetic and regime.real_fraction > 0:
            base = Regime(regime.real_fraction, False).name
            for m in metrics:
                diff = [a[m] - b[m] for a, b in zip(by_name[regime.name], by_name[base])]
                out[f"gain_{base}_{m}_mean"], out[f"gain_{base}_{m}_std"] = mean_std(diff)
    return out


def curve_rows(summary: dict[str, float], fractions: Sequence[float]) -> list[dict[str, float]]:
    """One row per real fraction for ``dvc plots``: test AUC and accuracy (mean, std) without and with synthetic."""
    rows = []
    for f in sorted(set(float(x) for x in fractions) | {1.0}):
        real, mixed = Regime(f, False).name, Regime(f, True).name
        row: dict[str, float] = {"real_fraction": f}
        for m, short in (("auc", "auc"), ("accuracy", "acc")):
            for label, name in (("real", real), ("real_synthetic", mixed)):
                row[f"{short}_{label}"] = summary[f"{name}_{m}_mean"]
                row[f"{short}_{label}_std"] = summary[f"{name}_{m}_std"]
        rows.append(row)
    return rows


def training_set(regime: Regime, seed: int, real: Split, synthetic: Split, synthetic_fraction: float) -> Split:
    """The images and labels of one regime and seed: a real subset, then the synthetic images (if any)."""
    parts = []
    if regime.real_fraction > 0:
        idx = stratified_subset(real[1], regime.real_fraction, seed)
        parts.append((real[0][idx], real[1][idx]))
    if regime.synthetic:
        frac = synthetic_fraction if regime.real_fraction > 0 else 1.0  # syn_only: the whole cohort, same N as real
        idx = stratified_subset(synthetic[1], frac, seed) if frac < 1.0 else np.arange(len(synthetic[1]))
        parts.append((synthetic[0][idx], synthetic[1][idx]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_and_test(train: Split, val: Split, test: Split, recipe: Recipe, seed: int, select_every: int,
                   desc: str) -> dict[str, float]:
    """Train the recipe on ``train`` (selection on ``val`` every ``select_every`` steps); test AUC, accuracy,
    sensitivity, specificity, the training set size, the optimiser steps, the selected epoch, its val AUC and the wall
    time."""
    t0 = time.time()
    evaluator, history, _ = train_evaluator(*train, *val, recipe, seed=seed, desc=desc, select_every=select_every)
    scores = binary_metrics(evaluator.predict_proba(test[0]), test[1], evaluator.threshold)
    steps = recipe.epochs * -(-len(train[1]) // recipe.batch_size)
    best = max(history, key=lambda r: r["val_auc"])
    return {**scores, "n_train": len(train[1]), "steps": steps, "best_epoch": best["epoch"], "val_auc": best["val_auc"],
            "wall_time_s": time.time() - t0}


def run_regimes(regimes: Sequence[Regime], seeds: Sequence[int], real: Split, val: Split, test: Split,
                synthetic: Split | None, synthetic_fraction: float, recipe: Recipe,
                budget: Budget) -> dict[Regime, list[dict[str, float]]]:
    """Train and test every regime once per seed, the runs spread over the CPU cores
    (:func:`pipeline.core.runtime.parallel_map`).

    Args:
        regimes: the training sets to try.
        seeds: one run per seed and regime (a seed draws the real subset and seeds the training).
        real, val, test: the real splits; val selects each run's epoch and threshold, test scores it.
        synthetic: the synthetic cohort (None when no regime uses it).
        synthetic_fraction: share of the cohort added to real data (syn_only always uses all of it).
        recipe: the evaluator's recipe.
        budget: ``steps``: every run makes the evaluator's optimiser steps, in whole epochs of its own set;
            ``epochs``: ``recipe.epochs`` passes over every set.

    Returns:
        regime -> one score dict per seed, in ``seeds`` order.
    """
    per_epoch = -(-len(real[1]) // recipe.batch_size)  # the evaluator's epoch: its validation cadence in steps
    budget_steps = recipe.epochs * per_epoch
    jobs, keys = [], []
    for regime in regimes:
        for seed in seeds:
            train = training_set(regime, seed, real, synthetic, synthetic_fraction)
            epochs = recipe.epochs if budget == Budget.epochs else epochs_for_budget(len(train[1]), recipe.batch_size,
                                                                                     budget_steps)
            jobs.append((train, val, test, dataclasses.replace(recipe, epochs=epochs), seed, per_epoch,
                         f"{regime.name} seed {seed}"))
            keys.append(regime)
    results: dict[Regime, list[dict[str, float]]] = {r: [] for r in regimes}
    for regime, scores in zip(keys, parallel_map(train_and_test, jobs)):
        results[regime].append(scores)
    return results


def check_options(fractions: list[float], seeds: list[int], synthetic_fraction: float) -> None:
    """Raises PipelineError on an empty or out-of-range ``utility.fractions`` / ``seeds`` / ``synthetic_fraction``."""
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise PipelineError(f"utility.fractions must be a non-empty list of shares in (0, 1], got {fractions}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise PipelineError(f"utility.seeds must be a non-empty list of distinct integers, got {seeds}")
    if not 0.0 < synthetic_fraction <= 1.0:
        raise PipelineError(f"utility.synthetic_fraction must be in (0, 1], got {synthetic_fraction}")


