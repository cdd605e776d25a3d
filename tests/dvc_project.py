"""A real `dvc repro` of the tiny profile in a temporary git + DVC copy of the repository, built once per test session
and shared by the pytest-xdist workers (tests/test_dvc*.py each edit their own copy of it)."""

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
from filelock import FileLock


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


def ran_stages(repro_stdout: str) -> set[str]:
    """The stages a `dvc repro` ran, from its "Running stage 'name':" lines."""
    return {line.split("'")[1] for line in repro_stdout.splitlines() if line.startswith("Running stage")}


def restore(cwd: Path) -> None:
    """Back to the committed tiny run without rerunning it: git restores params.yaml, dvc.lock and the uncached
    metrics, ``dvc checkout`` the cached outputs. (A ``dvc repro`` back at the original params reran the changed
    chain instead of restoring it from the run cache: measured, 2.5 min for sample and what follows; for the
    autoencoder's chain it doubled the test's time.)"""
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=cwd, check=True)
    dvc(cwd, "checkout", "-f")


def build(root: Path) -> None:
    """Copy the pipeline into ``root``, make it a git + DVC project on the tiny profile, run the real `dvc repro` and
    commit the result (the baseline of `dvc metrics diff`)."""
    root.mkdir(parents=True, exist_ok=True)
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


def shared_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project, built by the first worker that asks for it; the others wait on a file lock, then reuse it.

    A failed build leaves nothing behind, so each worker that asks again fails on its own with the stage's error.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker else base  # under xdist every worker's basetemp sits in one session folder
    root, done = shared / "tiny_project", shared / "tiny_project.done"
    with FileLock(str(shared / "tiny_project.lock")):
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)
            try:
                build(root)
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
            done.touch()
    return root


def project_copy(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A private copy (worktree, git history, DVC cache) of the shared tiny project, for tests that change it."""
    dest = tmp_path_factory.mktemp(name) / "project"
    shutil.copytree(shared_project(tmp_path_factory), dest, symlinks=True)
    return dest
