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

from pipeline.guidance_sweep import SAMPLER_KEYS


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def downstream(cwd: Path, stage: str) -> set[str]:
    """``stage`` and every stage that depends, directly or not, on its outputs or files inside them (dvc.yaml)."""
    stages = yaml.safe_load((cwd / "dvc.yaml").read_text())["stages"]
    outs = {name: {next(iter(o)) if isinstance(o, dict) else o for o in st.get("outs", [])}
            for name, st in stages.items()}
    found, todo = {stage}, [stage]
    while todo:
        produced = outs[todo.pop()]
        for name, st in stages.items():
            if name not in found and any(d == o or d.startswith(o + "/") for d in st.get("deps", []) for o in produced):
                found.add(name)
                todo.append(name)
    return found


def stale_stages(cwd: Path) -> set[str]:
    status = json.loads(dvc(cwd, "status", "--json").stdout or "{}")
    return set(status)


def restore(cwd: Path) -> None:
    """Back to the committed tiny run without rerunning it: git restores params.yaml, dvc.lock and the uncached
    metrics, ``dvc checkout`` the cached outputs. (A ``dvc repro`` back at the original params reran the changed
    chain instead of restoring it from the run cache: measured, 2.5 min for sample and what follows; for the
    autoencoder's chain it doubled the test's time.)"""
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=cwd, check=True)
    dvc(cwd, "checkout", "-f")


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
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "tiny run"], cwd=root, check=True)  # `dvc metrics diff` baseline
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
        assert ran == downstream(project, "train_autoencoder")
        assert {"evaluate_autoencoder", "encode_latents", "tune", "train_ldm", "sample", "fid"} <= ran
        assert not ran & {"prepare", "fid_ref", "train_classifier"}
    finally:
        restore(project)
    assert stale_stages(project) == set()


@pytest.mark.parametrize("key,value", [("guidance_scale", 4.0), ("num_inference_steps", 3), ("clip_denoised", 0.0),
                                       ("eta", 0.0), ("balanced_per_class", 2), ("sample_seed", 5)])
def test_sampling_params_never_retrain(project, key, value):
    """`dvc exp run -S ldm.guidance_scale=4` must rerun sample and what follows, never training."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ldm"][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the guidance sweep samples as the cohorts do, so it follows their sampler settings (not guidance, its axis)
    follows = {"guidance_sweep"} if key in SAMPLER_KEYS else set()
    try:
        assert stale_stages(project) == {"sample"} | follows
        if key == "guidance_scale":  # run it for real once: only sample and fid run
            out = dvc(project, "repro").stdout
            assert "'train_ldm' didn't change" in out or "train_ldm" not in out
            ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
            assert ran == downstream(project, "sample") and {"sample", "fid", "sampling_speed"} <= ran
            assert not ran & {"train_autoencoder", "encode_latents", "tune", "train_ldm", "train_classifier"}
            diff = json.loads(dvc(project, "metrics", "diff", "--all", "--json").stdout)["metrics/fid.json"]
            for key in ("fid_inception_vs_train_n24", "kid_inception_vs_train_n24_mean",
                        "precision_k3_inception_vs_train_n24", "coverage_k3_inception_vs_test_n24",
                        "fid_domain_vs_test_n24", "label_fidelity_accuracy"):
                assert set(diff[key]) >= {"old", "new"}, key  # side by side: before and after the change
    finally:
        restore(project)
