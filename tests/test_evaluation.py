"""Sample-quality metrics: KID and PRDC against their references, the ``fid`` stage's outputs on the tiny profile, and
the committed real-data run against the measured figures of ``shared/REFERENCE.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluation.quality import kid, label_fidelity, matched_subset, prdc

REPO = Path(__file__).resolve().parents[1]


class _Identity(torch.nn.Module):
    """A 'feature extractor' that passes features through, so torchmetrics can score given features."""

    num_features = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_kid_equals_torchmetrics_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 16)), rng.normal(0.4, 1.3, size=(64, 16))
    tm = KernelInceptionDistance(feature=_Identity(), subsets=1, subset_size=64)
    tm.update(torch.tensor(b), real=True)
    tm.update(torch.tensor(a), real=False)
    theirs = tm.compute()[0].item()
    ours, std = kid(a, b, subset_size=64, n_subsets=1)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9) and std == 0.0


def test_kid_separates_distributions_and_is_seeded():
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)), rng.normal(0.5, 1, size=(300, 32))
    same, far = kid(a, b, 100, 20), kid(a, c, 100, 20)
    assert abs(same[0]) < 3 * same[1] + 0.01 and far[0] > 10 * abs(same[0]) and far[0] > 0.1
    assert kid(a, c, 100, 20, seed=3) == kid(a, c, 100, 20, seed=3)


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 8))
    same = prdc(real, real.copy(), k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="k=5"):
        prdc(real[:5], real[:5], k=5)


def test_matched_subset_takes_the_reference_class_counts():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    idx = matched_subset(labels, np.array([1, 0, 1, 1]))
    assert idx.tolist() == [0, 3, 4, 5]


def test_label_fidelity_of_a_perfect_and_a_reversed_evaluator():
    labels = np.array([0, 0, 1, 1, 1])
    good = label_fidelity(np.array([0.1, 0.2, 0.8, 0.9, 0.7]), labels, 0.5)
    assert good["label_fidelity_accuracy"] == 1.0 and good["label_fidelity_auc"] == 1.0
    bad = label_fidelity(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), labels, 0.5)
    assert bad["label_fidelity_accuracy"] == 0.0 and bad["label_fidelity_auc"] == 0.0


def test_fid_stage_writes_every_measure_with_reference_and_n(pipeline_run):
    m = json.loads((pipeline_run / "metrics/fid.json").read_text())
    keys = ["fid_inception_vs_train_n24", "fid_inception_normal_vs_train_normal_n12",
            "fid_inception_pneumonia_vs_train_pneumonia_n12", "fid_inception_vs_test_n24",
            "fid_domain_vs_train_n24", "fid_domain_normal_vs_test_normal_n12",
            "kid_inception_vs_train_n24_mean", "kid_inception_vs_test_n24_std",
            "precision_k3_inception_vs_train_n24", "recall_k3_inception_vs_train_n24",
            "density_k3_inception_vs_test_n24", "coverage_k3_inception_vs_test_n24",
            "label_fidelity_accuracy", "label_fidelity_auc", "fid_inception_real_train_vs_real_test_n24"]
    for key in keys:
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["fid_inception_vs_train_n24"] > 0 and m["fid_domain_vs_train_n24"] > 0
    assert 0 <= m["label_fidelity_accuracy"] <= 1 and 0 <= m["precision_k3_inception_vs_train_n24"] <= 1
    with np.load(pipeline_run / "data/sample_features.npz") as z:
        assert z["features"].shape == (24, 2048) and z["labels"].tolist() == [0] * 12 + [1] * 12


def test_committed_real_run_reproduces_the_reference_real_vs_real_fid():
    """metrics/fid.json is the committed output of the fid stage on the real data with the default params.yaml;
    its real train vs real test FID must match shared/REFERENCE.md (23.57 at N 4708 vs 624) within 0.5."""
    m = json.loads((REPO / "metrics" / "fid.json").read_text())
    assert m["fid_inception_real_train_vs_real_test_n624"] == pytest.approx(23.57, abs=0.5)


def test_stratified_labels_follow_the_train_proportions():
    from pipeline.guidance_sweep import stratified_labels

    labels = stratified_labels(np.array([0] * 1214 + [1] * 3494), 1000)
    assert len(labels) == 1000 and (labels == 0).sum() == 257 and labels[0] == 0 and labels[-1] == 1


def test_guidance_sweep_stage(pipeline_run):
    m = json.loads((pipeline_run / "metrics/guidance_sweep.json").read_text())
    for w in ("1", "3"):
        assert m[f"fid_vs_train_n24_sampled_n12_w{w}"] > 0 and m[f"fid_vs_val_n24_sampled_n12_w{w}"] > 0
        assert 0 <= m[f"label_fidelity_accuracy_w{w}"] <= 1
    rows = (pipeline_run / "metrics/plots/guidance_sweep.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:2] == ["guidance_scale", "fid"] and "fid_val" in rows[0].split("\t")
    assert len(rows) == 3
    by_val = min(rows[1:], key=lambda r: float(r.split("\t")[rows[0].split("\t").index("fid_val")]))
    assert m["selected_guidance_scale"] == float(by_val.split("\t")[0])  # the choice is made on val, not train
    for png in ("guidance_sweep.png", "guidance_sweep_samples.png"):
        assert (pipeline_run / "metrics/plots" / png).read_bytes()[:4] == b"\x89PNG"
