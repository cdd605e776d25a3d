"""The real `dvc repro` on the tiny profile, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_params


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def stale_stages(cwd: Path) -> set[str]:
    status = json.loads(dvc(cwd, "status", "--json").stdout or "{}")
    return set(status)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    dvc(root, "repro")
    return root


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
        assert stale_stages(project) == {"train_autoencoder"}  # dvc status lists the stage whose deps changed
        out = dvc(project, "repro").stdout
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert ran == {"train_autoencoder", "evaluate_autoencoder", "encode_latents", "train_ldm", "sample", "fid",
                       "sampling_speed"}
    finally:
        write_params(project / "params.yaml")
    dvc(project, "repro")  # back to the original params: restored from DVC's run cache
    assert stale_stages(project) == set()


@pytest.mark.parametrize("key,value", [("guidance_scale", 4.0), ("num_inference_steps", 3),
                                       ("balanced_per_class", 2), ("sample_seed", 5)])
def test_sampling_params_never_retrain(project, key, value):
    """`dvc exp run -S ldm.guidance_scale=4` must rerun sample and what follows, never training."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ldm"][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert stale_stages(project) == {"sample"}
        if key == "guidance_scale":  # run it for real once: only sample and fid run
            out = dvc(project, "repro").stdout
            assert "'train_ldm' didn't change" in out or "train_ldm" not in out
            ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
            assert ran == {"sample", "fid", "sampling_speed"}
    finally:
        write_params(project / "params.yaml")
