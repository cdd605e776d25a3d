"""The ``utility`` stage: stratified subsets, the run plan and its budget, paired statistics, and the real stage on the
tiny pipeline's data and synthetic cohort."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import run

from pipeline.core.artifacts import save_npz
from pipeline.core.cli import PipelineError, load_section
from pipeline.core.data import real_images
from pipeline.evaluation.classifier import Recipe
from pipeline.evaluation.utility import (
    Regime,
    epochs_for_budget,
    mean_std,
    plan,
    stratified_subset,
    summarise,
    training_set,
)
from pipeline.utility import load_cohort, read_recipe

REAL_TRAIN_COUNTS = (1214, 3494)  # PneumoniaMNIST train split: normal, pneumonia


def labels_of(counts: tuple[int, ...]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


@pytest.mark.parametrize("fraction,expect", [(0.1, (121, 349)), (0.25, (304, 874)), (1.0, REAL_TRAIN_COUNTS)])
def test_stratified_subset_keeps_each_class_share_exactly(fraction, expect):
    labels = np.random.default_rng(0).permutation(labels_of(REAL_TRAIN_COUNTS))
    idx = stratified_subset(labels, fraction, seed=3)
    assert tuple(np.bincount(labels[idx], minlength=2)) == expect
    assert len(np.unique(idx)) == len(idx) and (np.diff(idx) > 0).all()


def test_stratified_subset_is_seeded_and_nested():
    labels = labels_of((30, 70))
    a, b, c = (stratified_subset(labels, 0.1, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(a) <= set(stratified_subset(labels, 0.25, seed=0))  # 10 % lies inside 25 % for one seed
    assert np.array_equal(stratified_subset(labels, 1.0, seed=5), np.arange(100))
    assert np.bincount(labels[stratified_subset(labels, 0.001, seed=0)]).tolist() == [1, 1]  # a class never vanishes
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            stratified_subset(labels, bad, seed=0)


def test_plan_trains_the_real_baseline_once_and_always():
    names = [r.name for r in plan([0.25, 0.1])]
    assert names == ["syn_only", "real10", "real10_syn", "real25", "real25_syn", "real100", "real100_syn"]
    assert [r.name for r in plan([1.0, 1.0])] == ["syn_only", "real100", "real100_syn"]
    assert Regime(0.125, False).name == "real12p5"  # no dots in metrics keys


@pytest.mark.parametrize("n,expect", [(4708, 20), (471, 185), (1177, 78), (4708 * 2, 10), (471 + 4708, 18), (3, 1480)])
def test_same_steps_budget_rounds_to_whole_epochs(n, expect):
    budget = 20 * -(-4708 // 64)  # the evaluator: 20 epochs of 74 steps
    assert budget == 1480 and epochs_for_budget(n, 64, budget) == expect
    steps = expect * -(-n // 64)
    assert abs(steps - budget) <= -(-n // 64) / 2 + 1e-9  # within half an epoch of the evaluator's steps


def test_summary_holds_paired_differences_and_sample_std():
    seeds = [0, 1, 2]

    def runs(aucs):
        return [{"auc": a, "accuracy": a - 0.1, "n_train": 10, "steps": 5} for a in aucs]

    results = {Regime(0.0, True): runs([0.80, 0.82, 0.84]), Regime(0.5, False): runs([0.70, 0.75, 0.80]),
               Regime(0.5, True): runs([0.78, 0.79, 0.80]), Regime(1.0, False): runs([0.90, 0.91, 0.92]),
               Regime(1.0, True): runs([0.90, 0.90, 0.90])}
    s = summarise(results, seeds)
    assert s["real50_auc_mean"] == pytest.approx(0.75) and s["real50_auc_std"] == pytest.approx(0.05)
    assert s["real50_auc_seed2"] == 0.80 and s["syn_only_n_train"] == 10 and s["real100_syn_steps"] == 5
    assert s["tstr_gap_auc_mean"] == pytest.approx(0.09) and s["tstr_gap_auc_std"] == pytest.approx(0.01)
    assert s["gain_real50_auc_mean"] == pytest.approx(0.04) and s["gain_real50_auc_std"] == pytest.approx(0.04)
    assert s["gain_real100_accuracy_mean"] == pytest.approx(-0.01)
    assert mean_std([0.5]) == (0.5, 0.0)


def fake_sets(counts=(6, 10)):
    rng = np.random.default_rng(0)
    real = (rng.integers(0, 256, (sum(counts), 28, 28)).astype(np.uint8), labels_of(counts))
    syn = (rng.integers(0, 256, (sum(counts), 28, 28)).astype(np.uint8), labels_of(counts))
    return real, syn


def test_training_sets_add_the_synthetic_cohort_to_the_same_real_subset():
    real, syn = fake_sets()
    sub = stratified_subset(real[1], 0.5, seed=1)
    x, y = training_set(Regime(0.5, False), 1, real, syn, 1.0)
    xs, ys = training_set(Regime(0.5, True), 1, real, syn, 1.0)
    assert np.array_equal(x, real[0][sub]) and np.array_equal(y, real[1][sub])
    assert len(ys) == len(sub) + len(syn[1]) and np.array_equal(xs[:len(sub)], x)
    assert np.array_equal(xs[len(sub):], syn[0]) and np.array_equal(ys[len(sub):], syn[1])
    half = training_set(Regime(0.5, True), 1, real, syn, 0.5)[1]
    assert np.bincount(half[len(sub):]).tolist() == [3, 5]
    only = training_set(Regime(0.0, True), 1, real, syn, 0.5)  # synthetic only: the whole cohort, same N as real
    assert np.array_equal(only[0], syn[0])


def test_a_cohort_that_is_not_label_matched_is_refused(tmp_path):
    real, syn = fake_sets()
    with pytest.raises(PipelineError, match="dvc repro sample"):
        load_cohort(tmp_path, real)
    save_npz(tmp_path / "cohort_matched.npz", images=syn[0], labels=labels_of((7, 9)))
    with pytest.raises(PipelineError, match=r"not label-matched .*\[7, 9\] vs \[6, 10\]"):
        load_cohort(tmp_path, real)
    save_npz(tmp_path / "cohort_matched.npz", images=syn[0][:, :14, :14], labels=syn[1])
    with pytest.raises(PipelineError, match="rerun the sample stage"):
        load_cohort(tmp_path, real)


def test_recipe_comes_from_the_classifier_section(tmp_path):
    from conftest import REPO, default_params
    params = default_params()
    recipe = read_recipe(REPO / "params.yaml")
    assert recipe == Recipe.from_params(params["classifier"]) and recipe.epochs == params["classifier"]["epochs"]
    del params["classifier"]["lr"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match="lacks classifier.lr"):
        read_recipe(tmp_path / "p.yaml")
    params["classifier"]["lr"], params["classifier"]["lrr"] = 0.1, 0.1
    # a misspelt key is the section owner's error: train_classifier (declaring the whole section) rejects it
    from pipeline import train_classifier
    with pytest.raises(PipelineError, match="unknown params key.*classifier.lrr"):
        load_section(params, "classifier", [train_classifier.app])


def utility_args(ws, out, samples=None, params=None) -> list:
    return ["--params", params or ws.params, "--data", ws / "data/prepared", "--samples",
            samples or ws / "data/samples", "--real-runs", out / "utility_real.json", "--metrics", out / "utility.json",
            "--curve", out / "utility.tsv", "--figure", out / "utility.png"]


def run_both(ws, out, samples=None, params=None) -> int:
    """utility_real (the real-only runs), then utility (the regimes with the cohort), as dvc repro runs them."""
    code = run("utility_real", ["--params", params or ws.params, "--data", ws / "data/prepared",
                                "--out", out / "utility_real.json", "--metrics", out / "utility_real_metrics.json"])
    return code or run("utility", utility_args(ws, out, samples, params))


@pytest.fixture(scope="module")
def utility_run(pipeline_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("utility")
    assert run_both(pipeline_run, out) == 0
    return out


def test_stage_writes_numbers_for_every_regime_and_seed(utility_run, pipeline_run):
    m = json.loads((utility_run / "utility.json").read_text())
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in m.values()), m
    assert m["n_real_train"] == 24 and m["n_synthetic"] == 24 and m["n_test"] == 24 and m["n_seeds"] == 2
    assert m["budget_steps"] == 2 * 3  # tiny recipe: 2 epochs of ceil(24 / 8) steps
    n_train = {"syn_only": 24, "real50": 12, "real50_syn": 36, "real100": 24, "real100_syn": 48}
    steps = {"syn_only": 6, "real50": 6, "real50_syn": 5, "real100": 6, "real100_syn": 6}  # whole epochs nearest 6
    for name, n in n_train.items():
        assert m[f"{name}_n_train"] == n and m[f"{name}_steps"] == steps[name], name
        assert m[f"{name}_wall_time_s"] >= 0
        for metric in ("auc", "accuracy"):
            seeds = [m[f"{name}_{metric}_seed{s}"] for s in (0, 1)]
            assert all(0 <= v <= 1 for v in seeds)
            assert m[f"{name}_{metric}_mean"] == pytest.approx(np.mean(seeds), abs=1e-5)
            assert m[f"{name}_{metric}_std"] == pytest.approx(np.std(seeds, ddof=1), abs=1e-5)
    assert m["tstr_gap_auc_mean"] == pytest.approx(m["real100_auc_mean"] - m["syn_only_auc_mean"], abs=1e-5)
    for f in ("real50", "real100"):
        assert m[f"gain_{f}_auc_mean"] == pytest.approx(m[f"{f}_syn_auc_mean"] - m[f"{f}_auc_mean"], abs=1e-5)
    assert m["wall_time_s"] > 0


def test_stage_writes_the_curve_and_the_figure(utility_run):
    lines = (utility_run / "utility.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:3] == ["real_fraction", "auc_real", "auc_real_std"] and "auc_real_synthetic" in header
    assert [float(r.split("\t")[0]) for r in lines[1:]] == [0.5, 1.0]
    assert (utility_run / "utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(utility_run.glob(".*tmp*"))


def test_same_seed_gives_the_same_runs(utility_run, pipeline_run, tmp_path):
    params = yaml.safe_load(pipeline_run.params.read_text())
    params["utility"] |= {"seeds": [1], "fractions": [0.5]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_both(pipeline_run, tmp_path, params=tmp_path / "params.yaml") == 0
    again, first = (json.loads((d / "utility.json").read_text()) for d in (tmp_path, utility_run))
    for name in ("syn_only", "real50", "real50_syn", "real100"):
        assert again[f"{name}_auc_seed1"] == first[f"{name}_auc_seed1"], name
        assert again[f"{name}_auc_std"] == 0.0


def test_stage_refuses_a_mismatched_cohort(pipeline_run, tmp_path, capsys):
    images, labels = real_images(pipeline_run / "data/prepared", "train")
    (tmp_path / "samples").mkdir()
    save_npz(tmp_path / "samples/cohort_matched.npz", images=images[:20], labels=labels[:20])
    capsys.readouterr()
    (tmp_path / "out").mkdir()
    assert run("utility_real", ["--params", pipeline_run.params, "--data", pipeline_run / "data/prepared", "--out",
                                tmp_path / "out/utility_real.json", "--metrics", tmp_path / "out/m.json"]) == 0
    assert run("utility", utility_args(pipeline_run, tmp_path / "out", tmp_path / "samples")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "not label-matched" in err and "Traceback" not in err
    assert not (tmp_path / "out/utility.json").exists()
