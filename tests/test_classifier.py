"""The evaluator: the ``train_classifier`` stage on the tiny profile, its model folder, and the metric helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import default_params
from pipeline.core.cli import PipelineError
from pipeline.core.data import real_images
from pipeline.evaluation.classifier import (
    Recipe,
    binary_metrics,
    choose_threshold,
    load_classifier,
    roc_auc,
    train_evaluator,
)

METRIC_KEYS = {f"{split}_{m}" for split in ("test", "val") for m in ("auc", "accuracy", "sensitivity", "specificity")}


def test_stage_writes_metrics_curve_and_model(pipeline_run):
    metrics = json.loads((pipeline_run / "metrics/classifier.json").read_text())
    assert METRIC_KEYS | {"threshold", "best_epoch", "epochs", "wall_time_s"} == set(metrics)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
    assert metrics["epochs"] == 2 and metrics["best_epoch"] in (1, 2) and metrics["wall_time_s"] > 0
    curve = (pipeline_run / "metrics/plots/classifier_curve.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["epoch", "train_loss", "val_auc"] and len(curve) == 3  # header + 2 epochs
    best = max(curve[1:], key=lambda line: float(line.split("\t")[2]))
    assert int(best.split("\t")[0]) == metrics["best_epoch"]
    config = json.loads((pipeline_run / "models/classifier/config.json").read_text())
    assert config["class"] == "ResNet" and config["args"]["block_inplanes"] == [4, 8, 8, 8]
    assert config["size"] == 28 and config["input_size"] == 28
    assert config["threshold"] == pytest.approx(metrics["threshold"], abs=1e-6)
    assert 0.3 < config["normalisation"]["mean"] < 0.8 and 0.05 < config["normalisation"]["std"] < 0.4


def test_reloaded_model_reproduces_the_reported_metrics(pipeline_run):
    folder, data = pipeline_run / "models/classifier", pipeline_run / "data/prepared"
    images, labels = real_images(data, "test")
    assert images.shape == (24, 28, 28) and images.dtype == np.uint8
    evaluator = load_classifier(folder, torch.device("cpu"))
    prob = evaluator.predict_proba(images)
    assert prob.shape == (24,) and prob.dtype == np.float64 and ((0 < prob) & (prob < 1)).all()
    np.testing.assert_array_equal(prob, load_classifier(folder, torch.device("cpu")).predict_proba(images))
    np.testing.assert_allclose(prob, evaluator.predict_proba(images, batch_size=5), rtol=1e-5, atol=1e-7)
    metrics = json.loads((pipeline_run / "metrics/classifier.json").read_text())
    for key, value in binary_metrics(prob, labels, evaluator.threshold).items():
        assert value == pytest.approx(metrics[f"test_{key}"], abs=1e-5), key
    np.testing.assert_array_equal(evaluator.predict(images), (prob >= evaluator.threshold).astype(np.int64))


def test_predictions_and_features_depend_on_the_image(pipeline_run, monkeypatch):
    monkeypatch.setenv("CXR_PRECISION", "fp32")  # fc(features) == logits exactly: both in float32
    evaluator = load_classifier(pipeline_run / "models/classifier", torch.device("cpu"))
    images, _ = real_images(pipeline_run / "data/prepared", "val")
    prob = evaluator.predict_proba(images)
    assert prob.std() > 1e-4 and len(np.unique(prob.round(6))) > 10
    black = evaluator.predict_proba(np.zeros((1, 28, 28), np.uint8))
    assert np.abs(prob - black).max() > 1e-4
    feats = evaluator.features(images)
    assert feats.shape == (24, 8) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert (feats.std(axis=0) > 0).any()
    # the features are what the last layer reads: fc(features) gives the logits
    fc = evaluator.net.fc
    logits = feats @ fc.weight.detach().double().numpy().T + fc.bias.detach().double().numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-logits[:, 0])), prob, rtol=1e-5, atol=1e-6)


def test_evaluator_rejects_images_it_cannot_judge(pipeline_run):
    evaluator = load_classifier(pipeline_run / "models/classifier", torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8"):
        evaluator.predict_proba(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="28×28"):
        evaluator.features(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(PipelineError, match="not a classifier"):
        load_classifier(pipeline_run / "models/autoencoder")


def test_binary_metrics_on_a_hand_made_case():
    prob, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    # of the 4 (positive, negative) pairs, 3 are ranked right
    assert binary_metrics(prob, labels, 0.5) == {"auc": 0.75, "accuracy": 0.75, "sensitivity": 0.5,
                                                 "specificity": 1.0}
    assert binary_metrics(prob, labels, 0.35) == {"auc": 0.75, "accuracy": 0.75, "sensitivity": 1.0,
                                                  "specificity": 0.5}
    assert roc_auc(np.full(4, 0.3), labels) == 0.5  # ties count one half
    assert roc_auc(1 - prob, labels) == 0.25
    with pytest.raises(ValueError, match="both classes"):
        binary_metrics(prob, np.ones(4), 0.5)


def test_choose_threshold_maximises_youden_j():
    # separable: any threshold in (0.4, 0.6] is perfect; the rule takes the midpoint
    prob, labels = np.array([0.2, 0.4, 0.6, 0.9]), np.array([0, 0, 1, 1])
    t = choose_threshold(prob, labels)
    assert t == pytest.approx(0.5)
    assert binary_metrics(prob, labels, t)["accuracy"] == 1.0
    # J = 0.5 both at t = 0.225 (sens 1, spec 0.5) and t = 0.6 (sens 0.5, spec 1): the more specific one wins
    assert choose_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.6)
    # the threshold is no worse than any other on the data it was chosen on
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    prob = np.clip(0.3 * labels + rng.normal(0.35, 0.2, 200), 0, 1)
    t = choose_threshold(prob, labels)
    j = {s: sum(binary_metrics(prob, labels, s)[k] for k in ("sensitivity", "specificity")) for s in (t, 0.3, 0.5)}
    assert j[t] >= max(j.values()) - 1e-12


def test_recipe_is_seeded_and_selects_on_val():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 8)
    images = rng.integers(0, 120, (16, 12, 12)).astype(np.uint8) + (labels[:, None, None] * 100).astype(np.uint8)
    recipe = Recipe.from_params(default_params()["classifier"] | {"widths": [4, 4, 4, 4], "blocks": [1, 1, 1, 1],
                                                                 "input_size": 12, "epochs": 2, "batch_size": 8})
    assert recipe.widths == [4, 4, 4, 4] and recipe.epochs == 2
    runs = [train_evaluator(images, labels, images, labels, recipe, seed=3, device=torch.device("cpu"))
            for _ in range(2)]
    (ev, history, threshold), (ev2, _, _) = runs
    np.testing.assert_array_equal(ev.predict_proba(images), ev2.predict_proba(images))
    assert [h["epoch"] for h in history] == [1, 2] and threshold == ev.threshold
    assert roc_auc(ev.predict_proba(images), labels) == pytest.approx(max(h["val_auc"] for h in history))


# --- the guide (train_guide): another network with the evaluator's recipe ----------------------------------------------


def test_guide_stage_trains_another_network_with_the_evaluators_recipe(pipeline_run):
    import yaml

    from pipeline.train_guide import agreement

    params = yaml.safe_load(pipeline_run.params.read_text())
    metrics = json.loads((pipeline_run / "metrics/guide.json").read_text())
    assert METRIC_KEYS | {"test_agreement_with_evaluator", "val_agreement_with_evaluator", "threshold", "best_epoch",
                          "epochs", "seed", "wall_time_s"} == set(metrics)
    assert metrics["epochs"] == params["classifier"]["epochs"] and metrics["seed"] == params["guide"]["seed"]
    config = json.loads((pipeline_run / "models/guide/config.json").read_text())
    assert config["args"]["block_inplanes"] == params["guide"]["widths"] != params["classifier"]["widths"]
    assert config["role"].startswith("guide")
    images, _ = real_images(pipeline_run / "data/prepared", "test")
    guide, evaluator = (load_classifier(pipeline_run / f"models/{m}") for m in ("guide", "classifier"))
    p_guide, p_eval = guide.predict_proba(images), evaluator.predict_proba(images)
    assert metrics["test_agreement_with_evaluator"] == pytest.approx(
        agreement(p_guide, guide.threshold, p_eval, evaluator.threshold), abs=1e-6)
    assert not np.allclose(p_guide, p_eval)


def test_agreement_counts_the_same_calls():
    from pipeline.train_guide import agreement

    assert agreement(np.array([0.9, 0.2, 0.6, 0.4]), 0.5, np.array([0.7, 0.1, 0.3, 0.45]), 0.4) == 0.5
    with pytest.raises(ValueError, match="shape"):
        agreement(np.zeros(3), 0.5, np.zeros(4), 0.5)


def test_guide_stage_needs_the_evaluators_whole_recipe(pipeline_run, tmp_path, capsys):
    import yaml
    from conftest import run

    params = yaml.safe_load(pipeline_run.params.read_text())
    del params["classifier"]["epochs"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = run("train_guide", ["--params", tmp_path / "params.yaml", "--data", pipeline_run / "data/prepared",
                               "--classifier", pipeline_run / "models/classifier", "--out", tmp_path / "guide",
                               "--metrics", tmp_path / "guide.json", "--curve", tmp_path / "guide.tsv"])
    assert code == 1 and "classifier.epochs" in capsys.readouterr().err
    assert not (tmp_path / "guide").exists()
