"""Stage ``tune``: Bayesian search (Optuna TPE, seeded, with a pruner) over short trainings of the diffusion U-Net.

Searches the learning rate (log-uniform), the U-Net channels per level, the self-attention levels and the residual
blocks per level; every other ``train_ldm`` key is taken unchanged from params.yaml (see
:mod:`pipeline.diffusion.tune` for why the prediction type, schedule, normalisation and label dropout are not searched). The
objective is the validation denoising loss of the EMA weights after ``trial_steps`` steps (the number train_ldm
reports), minimised. The params.yaml defaults are the study's first trial, so the untuned settings are scored on the
same objective.

Storage: an SQLite file in the output folder by default; any SQLAlchemy URL (postgresql://..., mysql://...) from
``tune.storage`` or ``$CXR_TUNE_STORAGE`` lets workers on other machines join with ``python -m pipeline.tune_worker``
while the stage runs. ``workers`` > 1 starts that many local processes on one study.

Writes ``best_params.yaml`` (the keys train_ldm reads), ``trials.csv``, the study database (default storage),
``metrics/tune.json`` and PNG plots of the optimisation history and the parameter importances. With one worker the
same params and seed give the same trials and the same best parameters (training is deterministic on one machine);
with several workers, the order in which trials finish (and so what TPE sees) varies, and the result may too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
import typer
import yaml

from pipeline.core.artifacts import atomic_outputs, write_json
from pipeline.core.cli import PipelineError, params_option, read_keys, run_stage
from pipeline.diffusion.latents import load_train_val
from pipeline.diffusion.tune import (FIXED, SEARCHED, STORAGE_ENV, TrainingKeys, create_study, ldm_values,
                                     open_storage, parse_attention, parse_channels, resolve_storage, run_worker,
                                     summary)
from pipeline.figures.charts import save_optuna_figure

SECTION = "tune"
EXTRA_PARAMS = {"train_ldm": SEARCHED + FIXED}  # keys of train_ldm's section this stage reads (defaults, fixed)
app = typer.Typer(add_completion=False, help=__doc__)


def ldm_settings(params: Path) -> dict:
    """The :data:`EXTRA_PARAMS` keys of the params file's ``train_ldm`` section, type-checked."""
    return read_keys(params, "train_ldm", TrainingKeys, "tune", EXTRA_PARAMS["train_ldm"])


def _spawn_workers(n: int, storage: str, name: str, latents: Path, threads: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop(STORAGE_ENV, None)
    return [subprocess.Popen([sys.executable, "-m", "pipeline.tune_worker", "--storage", storage, "--study", name,
                              "--latents", str(latents), "--index", str(i), "--quiet"], env=env)
            for i in range(1, n)]


@app.command()
def main(
    latents: Path = typer.Option(..., help="Latents folder (output of encode_latents)."),
    out: Path = typer.Option(..., help="Output folder: best_params.yaml, trials.csv, study.db (default storage)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (best value, trial counts, wall time)."),
    history: Path = typer.Option(..., help="Output PNG: objective per trial and best so far."),
    importance: Path = typer.Option(..., help="Output PNG: parameter importances (fANOVA)."),
    params: Path = params_option(),
    n_trials: int = typer.Option(..., min=1, help="Budget: trials in the study (all workers together), pruned and "
                                 "failed ones included."),
    timeout_min: float = typer.Option(..., min=0.0, help="Budget: no trial starts after this many minutes from the "
                                      "study's start (0 = no limit). Hitting it makes the run depend on speed."),
    trial_steps: int = typer.Option(..., min=1, help="Optimiser steps of one trial (ldm.batch_size latents each)."),
    eval_every: int = typer.Option(..., min=1, help="Steps between the validation losses the pruner sees."),
    lr_range: list[float] = typer.Option(..., help="Learning rate: low and high, log-uniform."),
    channel_options: list[str] = typer.Option(..., help="U-Net channels per level to choose from, "
                                              "e.g. '32,64,128' (each divisible by ldm.norm_num_groups)."),
    attention_options: list[str] = typer.Option(..., help="Self-attention per level to choose from, one 0/1 "
                                                "digit per level, highest resolution first: '011'."),
    res_block_options: list[int] = typer.Option(..., help="Residual blocks per level to choose from."),
    startup_trials: int = typer.Option(..., min=0, help="Random trials before TPE models the objective; also the "
                                       "trials the median pruner waits for."),
    pruner: str = typer.Option(..., help="median, hyperband or none."),
    workers: int = typer.Option(..., min=1, help="Local worker processes sharing the study (1 = reproducible)."),
    storage: str = typer.Option(..., help=f"SQLAlchemy URL of the study; empty: SQLite in the output folder. "
                                f"${STORAGE_ENV} wins over it."),
    study_name: str = typer.Option(..., help="Study name (must not exist yet in the storage)."),
    seed: int = typer.Option(..., help="Seed of the TPE sampler (worker i uses seed + i)."),
) -> None:
    """Tune the diffusion U-Net's learning rate and architecture on short trainings; write the best parameters."""
    t0 = time.time()
    if len(lr_range) != 2 or not 0 < lr_range[0] <= lr_range[1]:
        raise PipelineError(f"params key 'tune.lr_range' must be [low, high] with 0 < low <= high, got {lr_range}")
    ldm = ldm_settings(params)
    for option in channel_options:
        if any(c % ldm["norm_num_groups"] for c in parse_channels(option)):
            raise PipelineError(f"tune.channel_options entry {option!r}: every width must be divisible by "
                                f"train_ldm.norm_num_groups = {ldm['norm_num_groups']}")
        bad = [a for a in attention_options if len(parse_attention(a)) != len(parse_channels(option))]
        if bad:
            raise PipelineError(f"tune.attention_options {bad} need one digit per level of {option!r}")
    space = {"lr_range": lr_range, "channel_options": channel_options, "attention_options": attention_options,
             "res_block_options": res_block_options}
    budget = {"n_trials": n_trials, "timeout_min": timeout_min, "trial_steps": trial_steps,
              "eval_every": eval_every, "startup_trials": startup_trials, "pruner": pruner}
    fixed = {k: ldm[k] for k in FIXED} | {"seed": seed}
    data, _, _ = load_train_val(latents, ldm["latent_norm"])  # fails clearly before a study is created
    with atomic_outputs(out, metrics, history, importance) as (tmp_out, tmp_metrics, tmp_history, tmp_importance):
        tmp_out.mkdir()
        url = resolve_storage(storage, tmp_out / "study.db")
        store = open_storage(url)
        study, enqueued = create_study(store, study_name, space, fixed, budget, ldm)
        typer.echo(f"study {study_name!r} in {url}: {n_trials} trials of {trial_steps} steps, "
                   f"{workers} worker(s); params.yaml defaults {'are' if enqueued else 'are not'} trial 0", err=True)
        threads = max(1, torch.get_num_threads() // workers)
        procs = _spawn_workers(workers, url, study_name, latents, threads)
        if workers > 1:
            torch.set_num_threads(threads)
        run_worker(store, study_name, latents, index=0, data=data)
        failed = [p.args for p in procs if p.wait() != 0]
        if failed:
            typer.echo(f"warning: {len(failed)} worker process(es) exited with an error", err=True)
        result = summary(study)
        if result["best"] is None:
            raise PipelineError(f"no trial of study {study_name!r} completed ({result['n_pruned']} pruned, "
                                f"{result['n_failed']} failed); see the log above")
        best = result["best"]
        tuned = ldm_values(best.params)
        (tmp_out / "best_params.yaml").write_text(yaml.safe_dump(
            {"ldm": tuned, "objective": f"val denoising loss of the EMA weights after {trial_steps} steps",
             "value": best.value, "trial": best.number, "study": study_name}, sort_keys=False))
        study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration")).to_csv(
            tmp_out / "trials.csv", index=False)
        save_optuna_figure(tmp_history, lambda: optuna.visualization.matplotlib.plot_optimization_history(study))
        save_optuna_figure(tmp_importance, lambda: optuna.visualization.matplotlib.plot_param_importances(study))
        write_json(tmp_metrics, {
            "best_val_loss": round(best.value, 6), "best_trial": best.number,
            "defaults_val_loss": None if result["defaults_value"] is None else round(result["defaults_value"], 6),
            "trials_complete": result["n_complete"], "trials_pruned": result["n_pruned"],
            "trials_failed": result["n_failed"], "trial_steps": trial_steps, "workers": workers,
            "wall_time_s": round(time.time() - t0, 1)})
        store.remove_session()
    typer.echo(f"best val loss {best.value:.5f} (trial {best.number}; defaults: {result['defaults_value']}): "
               f"{tuned}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
