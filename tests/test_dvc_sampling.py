"""Sampling params (`dvc exp run -S ldm.guidance_scale=4`) rerun sampling and what follows, never training: checked by
DVC on a copy of the tiny project of tests/dvc_project.py, in its own file so that another xdist worker runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_project import downstream, dvc, project_copy, ran_stages, restore, stale_stages

from pipeline.guidance_sweep import EXTRA_PARAMS as SWEEP_PARAMS


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    return project_copy(tmp_path_factory, "project_sampling")


@pytest.mark.parametrize("key,value", [("guidance_scale", 4.0), ("num_inference_steps", 3), ("clip_denoised", 0.0),
                                       ("eta", 0.0), ("x0_spread", 1.0), ("balanced_per_class", 2),
                                       ("sample_seed", 5)])
def test_sampling_params_never_retrain(project, key, value):
    """`dvc exp run -S ldm.guidance_scale=4` must rerun sample and what follows, never training."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ldm"][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the guidance sweep samples as the cohorts do, so it follows their sampler settings (not guidance, its axis)
    follows = {"guidance_sweep"} if key in SWEEP_PARAMS["ldm"] else set()
    try:
        # check_params and report (seconds) depend on the whole params file
        assert stale_stages(project) == {"check_params", "report", "sample"} | follows
        if key == "guidance_scale":  # run it for real once: only sample and fid run
            out = dvc(project, "repro").stdout
            assert "'train_ldm' didn't change" in out or "train_ldm" not in out
            ran = ran_stages(out)
            assert ran == downstream(project, "sample") | {"check_params"} and {"sample", "fid", "sampling_speed"} <= ran
            assert not ran & {"train_autoencoder", "encode_latents", "tune", "train_ldm", "train_classifier"}
            diff = json.loads(dvc(project, "metrics", "diff", "--all", "--json").stdout)["metrics/fid.json"]
            for key in ("fid_inception_vs_train_n24", "kid_inception_vs_train_n24_mean",
                        "precision_k3_inception_vs_train_n24", "coverage_k3_inception_vs_test_n24",
                        "fid_domain_vs_test_n24", "label_fidelity_accuracy"):
                assert set(diff[key]) >= {"old", "new"}, key  # side by side: before and after the change
    finally:
        restore(project)
