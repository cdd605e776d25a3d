"""The real `dvc repro` on the tiny profile, in a temporary copy of the repository: every stage runs and writes the
lock, a second repro runs nothing, and a training param reruns exactly its stage and what follows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc_project import downstream, dvc, project_copy, ran_stages, restore, stale_stages


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    return project_copy(tmp_path_factory, "project")


def test_repro_runs_every_stage_and_writes_the_lock(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert set(lock["stages"]) == set(stages)
    for path in ["data/prepared/train.npz", "data/fid_ref/test.npz", "models/autoencoder/model.safetensors",
                 "data/latents/scale.json", "metrics/autoencoder.json", "metrics/latents.json",
                 "models/ldm/config.json", "data/samples/cohort_matched.npz", "metrics/fid.json"]:
        assert (project / path).is_file(), path
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    assert "test_psnr_db" in json.dumps(shown) and "scale_factor" in json.dumps(shown)


def test_second_repro_runs_nothing(project):
    out = dvc(project, "repro").stdout
    assert "Running stage" not in out, out
    assert stale_stages(project) == set()


def test_a_param_reruns_only_its_stage_and_what_follows(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["autoencoder"]["epochs"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert stale_stages(project) == {"check_params", "report", "train_autoencoder"}  # whose deps changed (the params file)
        out = dvc(project, "repro").stdout
        ran = ran_stages(out)
        assert ran == downstream(project, "train_autoencoder") | {"check_params"}
        assert {"evaluate_autoencoder", "encode_latents", "tune", "train_ldm", "sample", "fid"} <= ran
        assert not ran & {"prepare", "fid_ref", "train_classifier"}
    finally:
        restore(project)
    assert stale_stages(project) == set()


def test_a_misspelt_key_stops_the_run_naming_the_closest_key(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ldm"]["guidance_scal"] = 4.0  # the typo that used to be ignored silently
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert "check_params" in stale_stages(project)  # the whole file is checked whenever it changes
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                   f"{os.environ['PATH']}", "PYTHONPATH": str(project)})
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "'ldm.guidance_scal'" in out and "did you mean 'ldm.guidance_scale'" in out, out[-3000:]
        assert "Running stage 'train_ldm'" not in out
    finally:
        restore(project)
