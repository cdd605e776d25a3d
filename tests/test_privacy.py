"""The ``privacy`` stage: nearest-neighbour distances, the near-copy rule and its gate, and MS-SSIM diversity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run

from pipeline.core.artifacts import save_npz
from pipeline.core.cli import PipelineError
from pipeline.core.data import real_images
from pipeline.evaluation.privacy import (
    distance_ratio,
    msssim,
    msssim_of_pairs,
    near_copy_mask,
    nearest_two,
    quantiles,
    random_pairs,
    unique_indices,
    unit_pixels,
)
from pipeline.privacy import load_cohort


def test_nearest_two_on_points_of_a_line():
    ref = np.array([[0.0], [1.0], [3.0]])
    d1, d2, idx = nearest_two(np.array([[0.9], [2.5], [3.0]]), ref)
    assert d1 == pytest.approx([0.1, 0.5, 0.0]) and d2 == pytest.approx([0.9, 1.5, 2.0])
    assert idx.tolist() == [1, 2, 2]


def test_nearest_two_matches_brute_force_whatever_the_chunk():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 5)), rng.normal(size=(23, 5))
    full = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1))
    expect = np.sort(full, axis=1)
    for chunk in (1, 10, 100):
        d1, d2, idx = nearest_two(q, r, chunk_size=chunk)
        assert np.allclose(d1, expect[:, 0]) and np.allclose(d2, expect[:, 1])
        assert idx.tolist() == full.argmin(1).tolist()
    with pytest.raises(ValueError, match="at least 2"):
        nearest_two(q, r[:1])


def test_near_copy_rule_is_d1_below_ratio_times_d2():
    d1, d2 = np.array([0.1, 0.5, 0.0, 1.0, 0.0]), np.array([0.9, 1.5, 0.0, 1.1, 2.0])
    assert distance_ratio(d1, d2) == pytest.approx([1 / 9, 1 / 3, 0.0, 1 / 1.1, 0.0])
    assert near_copy_mask(d1, d2, 0.333).tolist() == [True, False, True, False, True]
    assert near_copy_mask(d1, d2, 0.34).tolist() == [True, True, True, False, True]


def test_duplicates_in_train_are_merged_so_a_copy_of_them_is_still_caught():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(6, 4, 4)).astype(np.uint8)
    train[4] = train[1]
    train[4, 0, 0] ^= 1          # a duplicate one grey level off
    train[5] = train[4]          # and a duplicate of the duplicate (one group of three)
    keep = unique_indices(unit_pixels(train), tol=0.1)
    assert keep.tolist() == [0, 1, 2, 3]
    copy = train[1:2].copy()
    copy[0, 3, 3] ^= 1           # a copy one grey level off both duplicates
    d1, d2, _ = nearest_two(unit_pixels(copy), unit_pixels(train))
    assert not near_copy_mask(d1, d2, 0.333)[0]          # hidden by the duplicates: d1 / d2 = 1/sqrt(2)
    d1, d2, idx = nearest_two(unit_pixels(copy), unit_pixels(train[keep]))
    assert near_copy_mask(d1, d2, 0.333)[0] and keep[idx[0]] == 1


def test_quantiles_and_random_pairs():
    assert quantiles(np.arange(101.0)) == {"p01": 1.0, "p05": 5.0, "p50": 50.0}
    i, j = random_pairs(5, 1000, np.random.default_rng(0))
    assert (i != j).all() and i.min() == 0 and j.max() == 4
    i2, j2 = random_pairs(5, 1000, np.random.default_rng(0))
    assert (i == i2).all() and (j == j2).all()


def test_msssim_at_28px_is_one_for_identical_images_and_low_for_unrelated_noise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 1, 28, 28, generator=g), torch.rand(8, 1, 28, 28, generator=g)
    same = msssim(a, a.clone(), kernel_size=5, sigma=1.0, scales=3)
    noise = msssim(a, b, kernel_size=5, sigma=1.0, scales=3)
    assert same.shape == (8,) and torch.allclose(same, torch.ones(8))
    assert (noise >= 0).all() and noise.mean() < 0.05
    smooth = torch.nn.functional.avg_pool2d(a, 5, stride=1, padding=2)
    shifted = torch.roll(smooth, 1, dims=-1)
    assert 0.3 < msssim(smooth, shifted, 5, 1.0, 3).mean() < 0.99
    with pytest.raises(ValueError):
        msssim(a, b, kernel_size=11, sigma=1.5, scales=3)  # 11-px window does not fit 7-px third scale


def test_msssim_of_pairs_is_seeded_and_one_for_a_collapsed_set():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 28, 28)).astype(np.uint8)
    collapsed = np.repeat(images[:1], 10, axis=0)
    assert msssim_of_pairs(collapsed, 30, np.random.default_rng(0), 5, 1.0, 3) == pytest.approx(np.ones(30))
    a = msssim_of_pairs(images, 30, np.random.default_rng(3), 5, 1.0, 3, batch_size=7)
    b = msssim_of_pairs(images, 30, np.random.default_rng(3), 5, 1.0, 3)
    assert a == pytest.approx(b, abs=1e-6) and a.mean() < 0.05


def test_features_of_another_cohort_are_refused(tmp_path):
    (tmp_path / "s").mkdir()
    save_npz(tmp_path / "s/cohort_matched.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([0, 0, 1, 1]))
    save_npz(tmp_path / "f.npz", features=np.zeros((4, 2048), np.float32), labels=np.array([0, 1, 1, 1]))
    with pytest.raises(PipelineError, match="rerun the fid stage"):
        load_cohort(tmp_path / "s", tmp_path / "f.npz")
    with pytest.raises(PipelineError, match="dvc repro fid"):
        load_cohort(tmp_path / "s", tmp_path / "missing.npz")


def test_privacy_stage_writes_numbers_and_figures(pipeline_run):
    m = json.loads((pipeline_run / "metrics/privacy.json").read_text())
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in m.values()), m
    assert m["n_synthetic"] == 24 and m["n_train"] == 24 and 2 <= m["n_train_distinct"] <= 24
    assert m["near_copies"] == 0 and m["pixel_near_copies"] == 0 and m["inception_near_copies"] == 0
    for space in ("pixel", "inception"):
        assert 0 < m[f"{space}_d1_synthetic_p01"] <= m[f"{space}_d1_synthetic_p05"] <= m[f"{space}_d1_synthetic_p50"]
        assert 0 < m[f"{space}_d1_test_p01"] <= m[f"{space}_d1_test_p50"]
        assert 0 <= m[f"{space}_synthetic_below_test_p01"] <= m[f"{space}_synthetic_below_test_p05"] <= 1
        assert 0 < m[f"{space}_ratio_synthetic_min"] <= 1 and 0 < m[f"{space}_ratio_test_min"] <= 1
    for cls in ("normal", "pneumonia"):
        syn, real = m[f"msssim_{cls}_synthetic"], m[f"msssim_{cls}_real_train"]
        assert 0 <= syn <= 1 and 0.05 < real < 1  # real chest X-rays of one class share structure
        assert m[f"msssim_{cls}_diff"] == pytest.approx(syn - real, abs=2e-5)
    for name in ("privacy_closest_pairs.png", "privacy_distances.png"):
        assert (pipeline_run / f"metrics/plots/{name}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def plant_copies(ws, tmp: Path, which: list[int]) -> tuple[Path, Path]:
    """The tiny cohort with images ``which`` replaced by training images 0, 1, ... (and their Inception features)."""
    with np.load(ws / "data/samples/cohort_matched.npz") as z:
        images, labels = z["images"].copy(), z["labels"]
    with np.load(ws / "data/sample_features.npz") as z:
        feats = z["features"].copy()
    train, train_labels = real_images(ws / "data/prepared", "train")
    with np.load(ws / "data/fid_ref/train.npz") as z:
        train_feats = z["features"]
    for t, i in enumerate(which):
        images[i], feats[i] = train[t], train_feats[t]
    (tmp / "samples").mkdir()
    save_npz(tmp / "samples/cohort_matched.npz", images=images, labels=labels)
    save_npz(tmp / "features.npz", features=feats, labels=labels)
    return tmp / "samples", tmp / "features.npz"


def privacy_args(ws, tmp: Path, samples: Path, features: Path) -> list:
    return ["--params", ws.params, "--samples", samples, "--features", features, "--data", ws / "data/prepared",
            "--fid-ref", ws / "data/fid_ref", "--metrics", tmp / "out/privacy.json",
            "--pairs-figure", tmp / "out/pairs.png", "--distances-figure", tmp / "out/distances.png"]


def test_gate_fails_on_planted_training_copies_but_keeps_the_evidence(pipeline_run, tmp_path, capsys):
    samples, features = plant_copies(pipeline_run, tmp_path, [3, 20])
    capsys.readouterr()
    assert run("privacy", privacy_args(pipeline_run, tmp_path, samples, features)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 2 of 24 synthetic images are near-copies") and "Traceback" not in err
    assert "pixel 2, Inception 2" in err and "privacy.near_copy_ratio=0.333" in err
    assert "privacy.max_near_copies=0" in err and str(tmp_path / "out/pairs.png") in err
    m = json.loads((tmp_path / "out/privacy.json").read_text())
    assert m["near_copies"] == 2 and m["near_copy_fraction"] == pytest.approx(2 / 24, abs=1e-5)
    assert m["pixel_d1_synthetic_p01"] == 0.0 and m["pixel_ratio_synthetic_min"] == 0.0
    assert (tmp_path / "out/pairs.png").is_file() and (tmp_path / "out/distances.png").is_file()
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporaries left behind


def test_gate_passes_when_the_copies_are_allowed(pipeline_run, tmp_path):
    samples, features = plant_copies(pipeline_run, tmp_path, [5])
    args = privacy_args(pipeline_run, tmp_path, samples, features)
    assert run("privacy", args + ["--max-near-copies", "1"]) == 0
    assert json.loads((tmp_path / "out/privacy.json").read_text())["near_copies"] == 1
