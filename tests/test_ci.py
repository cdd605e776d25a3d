"""ci/repro.sh end to end on the tiny profile with a local-folder DVC remote, every step real: push the tiny run,
clone it fresh, then run the CI script with no change (nothing reruns), with a sampling param changed (exactly
``sample`` and what follows) and with a training param changed (that stage and what follows); the report lists the
changed params and metrics. Bad cases: an unreachable remote, a remote that lacks objects, an interrupted push."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from dvc_project import downstream, dvc, project_copy, stale_stages

CI = REPO / "ci" / "repro.sh"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]


def env(cwd: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(cwd), "PYTHON": sys.executable, "DVC_NO_ANALYTICS": "1"}


def ci(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(CI), *args], cwd=cwd, env=env(cwd), capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"ci/repro.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    return {ln.split("'")[1] for ln in proc.stdout.splitlines() if ln.startswith("Running stage '")}


def files_of(root: Path) -> dict[str, int]:
    """Every workspace file (not .git, not DVC's cache and scratch folder) and its size: nothing may be deleted."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and ".git" not in p.parts and p.relative_to(root).parts[:2] not in
            ((".dvc", "cache"), (".dvc", "tmp"))}


def set_param(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> tuple[Path, Path]:
    """The tiny project with a local-folder default remote, committed and pushed (outputs and run-cache)."""
    project = project_copy(tmp_path_factory, "ci_origin")
    store = project.parent / "store"
    dvc(project, "remote", "add", "-d", "store", str(store))
    subprocess.run(GIT + ["commit", "-qam", "remote"], cwd=project, check=True)
    dvc(project, "push", "--run-cache")
    return project, store


def fresh_clone(origin: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True)
    return dest


def test_ci_reruns_nothing_then_only_what_a_change_needs(pushed, tmp_path):
    origin, _ = pushed
    clone = fresh_clone(origin, tmp_path / "clone")
    assert not (clone / "models/ldm").exists()  # a fresh clone holds no outputs
    first = ci(clone)
    assert ran(first) == set(), first.stdout  # everything pulled, nothing reruns
    assert stale_stages(clone) == set()
    report = (clone / "ci-report.md").read_text()
    assert "**Stages run:** none" in report and "No params changed." in report

    # the pulled models generate images without any training
    gen = subprocess.run([sys.executable, "-m", "pipeline.generate", "--label", "pneumonia", "-n", "2", "--steps", "5",
                          "--out", str(tmp_path / "generated")], cwd=clone, env=env(clone), capture_output=True,
                         text=True)
    assert gen.returncode == 0, gen.stderr
    assert len(list((tmp_path / "generated").glob("*.png"))) >= 2

    old = yaml.safe_load((clone / "params.yaml").read_text())["ldm"]["guidance_scale"]
    set_param(clone, "ldm", "guidance_scale", old + 1.0)  # a sampling param
    sampling = ci(clone)
    assert ran(sampling) == downstream(clone, "sample") | {"check_params"}
    assert not ran(sampling) & {"train_autoencoder", "train_ldm", "tune", "train_classifier", "train_guide"}
    report = (clone / "ci-report.md").read_text()
    line = next(ln for ln in report.splitlines() if "ldm.guidance_scale" in ln)
    assert str(old) in line and str(old + 1.0) in line  # old and new values side by side
    assert "metrics/fid.json" in report and "metrics/sample.json" in report
    subprocess.run(GIT + ["commit", "-qam", "guidance"], cwd=clone, check=True)

    widths = yaml.safe_load((clone / "params.yaml").read_text())["guide"]["widths"]
    set_param(clone, "guide", "widths", widths[:-1] + [widths[-1] + 4])  # a training param: the guide's network
    training = ci(clone)
    assert ran(training) == downstream(clone, "train_guide") | {"check_params"}
    report = (clone / "ci-report.md").read_text()
    assert "guide.widths" in report and "metrics/guide.json" in report

    # what the CI pushed is on the remote: another fresh clone pulls it all and reruns nothing
    subprocess.run(GIT + ["commit", "-qam", "guide epochs"], cwd=clone, check=True)
    again = fresh_clone(clone, tmp_path / "again")
    shutil.copy(clone / ".dvc/config", again / ".dvc/config")
    assert ran(ci(again, "--strict")) == set()


def test_unreachable_remote_is_one_line_and_changes_nothing(pushed, tmp_path):
    origin, _ = pushed
    clone = fresh_clone(origin, tmp_path / "clone")
    dvc(clone, "remote", "add", "--local", "-d", "offline", "http://127.0.0.1:9/store")
    before = files_of(clone)
    proc = ci(clone, ok=False)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "'offline'" in errors[0] and "unreachable" in errors[0], proc.stderr
    assert files_of(clone) == before


def test_a_remote_lacking_objects_is_named_and_nothing_is_deleted(pushed, tmp_path):
    origin, _ = pushed
    clone = fresh_clone(origin, tmp_path / "clone")
    empty = tmp_path / "empty_store"
    empty.mkdir()
    dvc(clone, "remote", "add", "--local", "-d", "empty", str(empty))
    before = files_of(clone)
    proc = ci(clone, "--strict", ok=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    n_outs = sum(len(st.get("outs", [])) for st in yaml.safe_load((clone / "dvc.lock").read_text())["stages"].values())
    assert len(errors) == 1 and "'empty'" in errors[0] and "data/prepared" in errors[0], proc.stderr
    assert "lacks" in errors[0] and f"of {n_outs} outputs" in errors[0]
    assert files_of(clone) == before


def test_an_interrupted_push_is_finished_by_the_next_run(pushed, tmp_path):
    origin, store = pushed
    partial = tmp_path / "partial_store"
    shutil.copytree(store, partial)
    objects = sorted(p for p in partial.rglob("*") if p.is_file())
    for p in objects[::2] + [p for p in objects if p.name.endswith(".dir")]:
        p.unlink(missing_ok=True)  # cut short: half the files, and the folder manifests DVC uploads after them
    clone = fresh_clone(origin, tmp_path / "clone")
    shutil.copytree(origin / ".dvc/cache", clone / ".dvc/cache")  # the pushing side still has everything
    dvc(clone, "checkout")
    dvc(clone, "remote", "add", "--local", "-d", "partial", str(partial))
    ci(clone)  # pushes what is missing
    check = fresh_clone(origin, tmp_path / "check")
    dvc(check, "remote", "add", "--local", "-d", "partial", str(partial))
    dvc(check, "pull")  # fails if any object is still missing
    assert stale_stages(check) == set()
