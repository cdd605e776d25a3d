"""Faults a user hits (issue #44): a killed `dvc repro` must take its stage with it, a killed training resumes to the
same weights, temporaries of dead runs go away, any step count trains, and corrupt inputs give one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_subprocess, write_params
from safetensors.torch import load_file

from pipeline.core.artifacts import TMP_INFIX, atomic_outputs
from pipeline.core.optim import one_cycle


@pytest.mark.parametrize("pct", [0.05, 0.1, 0.25, 0.3])
def test_one_cycle_trains_any_step_count(pct):
    for total in range(1, 61):  # 10 steps at 0.1 and 20 at 0.05 divided by zero in OneCycleLR
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = one_cycle(opt, 1e-3, total, pct)
        lrs = []
        for _ in range(total):
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
        assert all(np.isfinite(lrs)) and max(lrs) <= 1e-3 * (1 + 1e-9), (total, lrs)
        if total >= 10:  # it warms up to the peak, then anneals (with fewer steps the grid may miss the peak)
            assert max(lrs) > 0.9e-3 and lrs[-1] < 0.1e-3, (total, max(lrs), lrs[-1])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_runs_are_removed(tmp_path):
    out = tmp_path / "ldm"
    dead = tmp_path / f".ldm{TMP_INFIX}{dead_pid()}"
    (dead / "half").mkdir(parents=True)
    (dead / "half" / "model.safetensors").write_bytes(b"\0" * 100)
    alive = tmp_path / f".ldm{TMP_INFIX}1"  # pid 1 runs: another run's temporary, left alone
    alive.mkdir()
    with atomic_outputs(out) as (tmp,):
        tmp.mkdir()
    assert out.is_dir() and not dead.exists() and alive.exists()
    git = subprocess.run(["git", "check-ignore", f"models/.ldm{TMP_INFIX}123", "models/.ldm.checkpoint"], cwd=REPO,
                         capture_output=True, text=True)
    assert git.stdout.split() == [f"models/.ldm{TMP_INFIX}123", "models/.ldm.checkpoint"]  # git ignores both


def ldm_args(ws, out: Path) -> list[str]:
    return ["--latents", ws / "data/latents", "--tuned", ws / "models/tune/best_params.yaml", "--out", out,
            "--metrics", out.parent / f"{out.name}.json", "--curve", out.parent / f"{out.name}.tsv"]


def start(module: str, args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"pipeline.{module}", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the stage ended before {path} appeared:\n{proc.communicate()[1][-2000:]}"
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


@pytest.fixture()
def long_ldm(pipeline_run, tmp_path):
    """The tiny profile with a training long enough to be killed midway."""
    return write_params(tmp_path / "params.yaml", train_ldm={"epochs": 60})


def test_a_killed_training_resumes_to_the_same_weights(pipeline_run, long_ldm, tmp_path):
    p = ["--params", long_ldm]
    whole = run_subprocess("train_ldm", ldm_args(pipeline_run, tmp_path / "whole") + p)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = start("train_ldm", ldm_args(pipeline_run, out) + p, REPO)
    wait_for(tmp_path / ".killed.checkpoint" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)  # no clean-up at all
    proc.wait()
    assert not out.exists()
    resumed = run_subprocess("train_ldm", ldm_args(pipeline_run, out) + p)
    assert resumed.returncode == 0, resumed.stderr
    first = re.search(r"train_ldm:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", resumed.stderr)
    assert first and 0 < int(first.group(1)) < int(first.group(2)), resumed.stderr[-2000:]  # it started midway
    a, b = load_file(str(tmp_path / "whole/model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole.tsv").read_text() == (tmp_path / "killed.tsv").read_text()  # the same curve, too
    assert not (tmp_path / ".killed.checkpoint").exists()  # a finished run removes its checkpoint


def test_a_killed_parent_takes_its_stage_and_temporaries_with_it(pipeline_run, long_ldm, tmp_path):
    out = tmp_path / "orphan"
    child = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'pipeline.train_ldm', "
             f"*{[str(a) for a in ldm_args(pipeline_run, out) + ['--params', long_ldm]]!r}]); "
             "print(p.pid, flush=True); p.wait()")
    parent = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    pid = int(parent.stdout.readline())
    t0 = time.time()
    while not (tmp_path / ".orphan.checkpoint").exists():  # the stage is training
        assert time.time() - t0 < 300 and not gone(pid)
        time.sleep(0.05)
    parent.send_signal(signal.SIGKILL)  # as a CI timeout kills `dvc repro`
    parent.wait()
    t0 = time.time()
    while not gone(pid):
        assert time.time() - t0 < 30, "the stage outlived its parent"
        time.sleep(0.1)
    assert not out.exists()  # it never wrote outputs nobody asked for
    assert not list(tmp_path.glob(f".orphan{TMP_INFIX}*"))


def test_a_truncated_model_file_is_one_line_naming_it_and_its_stage(pipeline_run, tmp_path):
    import shutil

    model = tmp_path / "autoencoder"
    shutil.copytree(pipeline_run / "models/autoencoder", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_subprocess("encode_latents", ["--data", pipeline_run / "data/prepared", "--model", model,
                                             "--out", tmp_path / "latents", "--metrics", tmp_path / "m.json"])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.safetensors" in lines[0], proc.stderr
    assert "train_autoencoder" in lines[0]
    assert not (tmp_path / "latents").exists()


def test_a_prepared_split_with_wrong_keys_is_one_line_naming_it_and_its_stage(pipeline_run, tmp_path):
    import shutil

    data = tmp_path / "prepared"
    shutil.copytree(pipeline_run / "data/prepared", data)
    np.savez(data / "train.npz", pictures=np.zeros((2, 1, 32, 32), np.uint8))
    proc = run_subprocess("encode_latents", ["--data", data, "--model", pipeline_run / "models/autoencoder",
                                             "--out", tmp_path / "latents", "--metrics", tmp_path / "m.json"])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "train.npz" in lines[0], proc.stderr
    assert "prepare" in lines[0]
