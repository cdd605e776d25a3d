"""The Optuna tune stage: its outputs and train_ldm's use of them, two worker processes on one study, failed trials,
and a rerun that reproduces the best parameters (tiny profile); on a real PostgreSQL server (tests/postgres_server.py):
the stage with two workers on one study, and a worker killed mid-trial that leaves the study usable."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import sqlalchemy
import yaml
from conftest import REPO, run, run_subprocess, write_params
from postgres_server import postgres_server

from pipeline.diffusion import tune as tuning
from pipeline.diffusion.training import NonFiniteLoss
from pipeline.diffusion.tune import (
    SEARCHED,
    create_study,
    open_storage,
    run_worker,
    summary,
)


def tune_args(ws, out, params) -> list:
    """Arguments of the tune stage writing to folder ``out`` and files beside it."""
    return ["--latents", ws / "data/latents", "--out", out, "--params", params,
            "--metrics", f"{out}_tune.json", "--history", f"{out}_history.png", "--importance", f"{out}_importance.png"]


def tiny_study(tmp_path, n_trials: int, trial_steps: int = 4, name: str = "s", url: str | None = None):
    """A study on the tiny profile's space, created as the stage creates it, in ``url`` (default: an SQLite file
    under ``tmp_path``)."""
    params = yaml.safe_load((REPO / "tests/params_tiny.yaml").read_text())
    tune, ldm = params["tune"], params["train_ldm"]
    url = url or f"sqlite:///{tmp_path / 'study.db'}"
    space = {k: tune[k] for k in ("lr_range", "channel_options", "attention_options", "res_block_options")}
    budget = {"n_trials": n_trials, "timeout_min": 0.0, "trial_steps": trial_steps, "eval_every": 2,
              "startup_trials": 1, "pruner": "none"}
    fixed = {k: ldm[k] for k in tuning.FIXED} | {"seed": tune["seed"]}
    study, _ = create_study(open_storage(url), name, space, fixed, budget, ldm)
    return url, study


def test_tune_outputs_feed_train_ldm(pipeline_run):
    best = yaml.safe_load((pipeline_run / "models/tune/best_params.yaml").read_text())
    tune = yaml.safe_load(pipeline_run.params.read_text())["tune"]
    assert set(best["ldm"]) == set(SEARCHED)
    assert tune["lr_range"][0] <= best["ldm"]["lr"] <= tune["lr_range"][1]
    assert ",".join(map(str, best["ldm"]["channels"])) in tune["channel_options"]
    metrics = json.loads((pipeline_run / "metrics/tune.json").read_text())
    assert metrics["trials_complete"] + metrics["trials_pruned"] + metrics["trials_failed"] == tune["n_trials"]
    assert metrics["best_val_loss"] == pytest.approx(best["value"], abs=1e-6)
    assert metrics["best_val_loss"] <= metrics["defaults_val_loss"]  # the defaults are trial 0 of the study
    study = optuna.load_study(study_name=tune["study_name"],
                              storage=f"sqlite:///{pipeline_run / 'models/tune/study.db'}")
    assert study.trials[0].user_attrs["origin"] == "params.yaml defaults"
    assert study.best_trial.number == best["trial"]
    for png in ("tune_history.png", "tune_importance.png"):
        assert (pipeline_run / "metrics/plots" / png).read_bytes()[:4] == b"\x89PNG"
    config = json.loads((pipeline_run / "models/ldm/config.json").read_text())
    assert config["args"]["channels"] == best["ldm"]["channels"]  # train_ldm built the tuned U-Net
    assert config["args"]["num_res_blocks"] == best["ldm"]["num_res_blocks"]
    assert config["training"]["lr"] == best["ldm"]["lr"]


def test_rerun_reproduces_best_params(pipeline_run):
    code = run("tune", tune_args(pipeline_run, pipeline_run / "models/tune_again", pipeline_run.params))
    assert code == 0
    first = yaml.safe_load((pipeline_run / "models/tune/best_params.yaml").read_text())
    again = yaml.safe_load((pipeline_run / "models/tune_again/best_params.yaml").read_text())
    assert again == first


def test_two_worker_processes_share_one_study(pipeline_run, tmp_path):
    n_trials = 6
    url, study = tiny_study(tmp_path, n_trials, trial_steps=40)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.tune_worker", "--storage", url, "--study", "s",
           "--latents", str(pipeline_run / "data/latents"), "--quiet"]
    procs = [subprocess.Popen(cmd + ["--index", str(i)], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    ran = {p.pid: set(json.loads(re.search(r"ran trials (\[.*\])", e).group(1))) for p, e in zip(procs, errs)}
    trials = optuna.load_study(study_name="s", storage=url).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # no duplicated trial
    assert n_trials <= len(trials) <= n_trials + 1  # the budget is shared (at most one trial in flight over it)
    assert all(t.state in tuning.FINISHED for t in trials)
    a, b = ran.values()
    assert a and b and not a & b and a | b == set(numbers)  # both worked; the union of their trials is the study
    for pid, mine in ran.items():
        assert {t.user_attrs["worker"].split(":")[1] for t in trials if t.number in mine} == {str(pid)}


def test_two_workers_never_claim_the_same_queued_trial(tmp_path):
    # Regression: on SQLite, Optuna's SELECT ... FOR UPDATE is a no-op, so two workers could both claim the queued
    # defaults trial and the second crashed (UpdateFinishedTrialError) when the first finished it. Without the fix,
    # 60 queued trials popped by two threads overlapped by 9 to 16 trials in three runs of this test.
    url, n = f"sqlite:///{tmp_path / 'race.db'}", 60
    study = optuna.create_study(storage=open_storage(url), study_name="race")
    for i in range(n):
        study.enqueue_trial({"x": i})
    claimed: list[list[int]] = [[], []]

    def claim(k: int) -> None:
        mine = optuna.load_study(study_name="race", storage=open_storage(url))  # its own engine, as a process has
        while (trial_id := mine._pop_waiting_trial_id()) is not None:
            claimed[k].append(trial_id)

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = map(set, claimed)
    assert not a & b
    assert len(claimed[0]) + len(claimed[1]) == n and a | b == {t._trial_id for t in study.trials}


def test_failed_and_non_finite_trials_are_recorded_and_the_study_goes_on(pipeline_run, tmp_path, monkeypatch):
    url, study = tiny_study(tmp_path, n_trials=4)
    real_fit, calls = tuning.fit, []

    def flaky_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated crash")
        if len(calls) == 2:
            raise NonFiniteLoss("loss became nan at step 1", args[0])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(tuning, "fit", flaky_fit)
    ran = run_worker(open_storage(url), "s", pipeline_run / "data/latents", progress=False)
    assert ran == [0, 1, 2, 3]
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states[:2] == [optuna.trial.TrialState.FAIL] * 2
    assert states[2:] == [optuna.trial.TrialState.COMPLETE] * 2
    result = summary(optuna.load_study(study_name="s", storage=url))
    assert (result["n_failed"], result["n_complete"]) == (2, 2)
    assert result["defaults_value"] is None  # trial 0 (the defaults) crashed


def test_existing_study_is_a_clear_error(pipeline_run, tmp_path):
    url, _ = tiny_study(tmp_path, n_trials=1)
    params = write_params(tmp_path / "params.yaml", tune={"storage": url, "study_name": "s"})
    proc = run_subprocess("tune", tune_args(pipeline_run, tmp_path / "out", params))
    assert proc.returncode == 1
    assert "a study named 's' already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_ldm_rejects_a_bad_tuned_file(pipeline_run, tmp_path):
    tuned = tmp_path / "best_params.yaml"
    tuned.write_text(yaml.safe_dump({"ldm": {"lr": 0.001, "channel": [8, 16]}}))
    proc = run_subprocess("train_ldm", ["--latents", pipeline_run / "data/latents", "--tuned", tuned,
                                        "--out", tmp_path / "ldm", "--metrics", tmp_path / "m.json",
                                        "--curve", tmp_path / "c.tsv", "--params", pipeline_run.params])
    assert proc.returncode == 1 and "ldm.channel" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ldm").exists()


def test_stage_with_two_local_workers(pipeline_run, tmp_path):
    params = write_params(tmp_path / "params.yaml", tune={"workers": 2, "n_trials": 5, "trial_steps": 30,
                                                          "eval_every": 10})
    proc = run_subprocess("tune", tune_args(pipeline_run, tmp_path / "tune", params))
    assert proc.returncode == 0, proc.stderr
    trials = optuna.load_study(study_name="ldm", storage=f"sqlite:///{tmp_path / 'tune/study.db'}").trials
    assert 5 <= len(trials) <= 6 and len({t.number for t in trials}) == len(trials)
    assert all(t.state in tuning.FINISHED for t in trials)
    assert "exited with an error" not in proc.stderr  # the spawned worker exited cleanly
    metrics = json.loads((tmp_path / "tune_tune.json").read_text())
    assert metrics["workers"] == 2 and metrics["trials_complete"] + metrics["trials_pruned"] == len(trials)


@pytest.fixture(scope="module")
def postgres() -> str:
    yield from postgres_server()


def test_stage_with_two_workers_on_postgresql(pipeline_run, postgres, tmp_path):
    # trials long enough (about 15 s each) that the spawned worker, which first imports torch, joins before the
    # stage's own worker has spent the budget; no pruning, so that no trial is cut short
    params = write_params(tmp_path / "params.yaml", tune={"workers": 2, "n_trials": 4, "trial_steps": 150,
                                                          "eval_every": 50, "pruner": "none", "storage": postgres})
    proc = run_subprocess("tune", tune_args(pipeline_run, tmp_path / "tune", params))
    assert proc.returncode == 0, proc.stderr
    assert "exited with an error" not in proc.stderr
    study = optuna.load_study(study_name="ldm", storage=postgres)
    trials = study.trials
    assert 4 <= len(trials) <= 5 and len({t.number for t in trials}) == len(trials)
    assert all(t.state in tuning.FINISHED for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, (workers, proc.stderr[-2000:])  # both processes ran trials of the one study
    assert not (tmp_path / "tune/study.db").exists()  # nothing went to the SQLite default
    assert sorted(p.name for p in (tmp_path / "tune").glob("best_params*")) == ["best_params.yaml"]  # written once
    best = yaml.safe_load((tmp_path / "tune/best_params.yaml").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)


def test_a_worker_killed_mid_trial_leaves_the_study_usable(pipeline_run, postgres, tmp_path):
    url, _ = tiny_study(tmp_path, n_trials=3, trial_steps=100000, name="killed", url=postgres)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.tune_worker", "--storage", url, "--study", "killed",
           "--latents", str(pipeline_run / "data/latents"), "--quiet"]
    worker = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    study = optuna.load_study(study_name="killed", storage=url)
    end = time.monotonic() + 300
    while not study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) and time.monotonic() < end:
        time.sleep(1)
    time.sleep(3)  # well inside its 100,000-step trial
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (stuck,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # the clock moves on past the storage's 2-minute grace period: the dead worker's last heartbeat, moved back 10 min
    # in the database, instead of a test that sleeps 2 minutes (the rows are Optuna's own table of heartbeats)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        moved = conn.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - interval "
                                             "'10 minutes' WHERE trial_id = :t"), {"t": stuck._trial_id}).rowcount
    engine.dispose()
    assert moved == 1  # the worker did beat while it lived

    # the rerun: short trials from here on (the budget lives in the study's attributes), the stuck one marked failed
    storage = optuna.storages.RDBStorage(url)
    budget = {**study.user_attrs["budget"], "trial_steps": 4}
    storage.set_study_user_attr(study._study_id, "budget", budget)
    rerun = subprocess.run(cmd + ["--index", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    trials = optuna.load_study(study_name="killed", storage=url).trials
    states = {t.number: t.state for t in trials}
    assert states[stuck.number] == optuna.trial.TrialState.FAIL  # the dead worker's trial
    assert len(trials) == 3 and all(s in tuning.FINISHED for s in states.values())  # the budget was spent, no more
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 2
