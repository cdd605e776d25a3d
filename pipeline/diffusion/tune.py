"""Optuna search over short trainings of the latent diffusion U-Net, shared by the ``tune`` stage and the
``tune_worker`` command (a worker that joins the stage's study).

A study holds everything a worker needs in its user attributes (search space, fixed training settings, budget and
start time), so a worker on another machine only needs the storage URL, the study name and the latents folder; it can
never search a different space than the stage that created the study.

Objective: the validation denoising loss of the EMA weights after ``trial_steps`` optimiser steps, on the whole val
split with fixed noise and timesteps (:func:`pipeline.diffusion.training.validation_loss`, the number ``train_ldm`` reports).
Trials warm the learning rate up over min(``ldm.warmup_steps``, a tenth of their steps), then decay it (cosine) to 0
at their last step, as a full training does over its length. The objective is deterministic, costs one forward pass
over 524 latents, and is comparable between trials because the prediction type, noise schedule, latent normalisation
and label dropout are fixed (each changes what the loss measures: a loss in v units is not one in epsilon units, and
the conditional loss rewards label_dropout = 0, which disables guidance).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
import yaml
from monai.networks.nets import DiffusionModelUNet

from pipeline.core.artifacts import seed_all
from pipeline.core.cli import PipelineError, check_keys, check_value
from pipeline.core.runtime import pick_device
from pipeline.diffusion.latents import load_train_val
from pipeline.diffusion.networks import unet_args
from pipeline.diffusion.schedule import make_ddpm, scheduler_args
from pipeline.diffusion.training import NonFiniteLoss, fit

__all__ = ["STORAGE_ENV", "SEARCHED", "FIXED", "TrainingKeys", "resolve_storage", "open_storage", "parse_channels",
           "ldm_values", "parse_attention", "make_sampler", "make_pruner", "suggest", "create_study", "run_worker",
           "summary", "read_tuned"]

STORAGE_ENV = "CXR_TUNE_STORAGE"
"""Environment variable holding a SQLAlchemy URL; it wins over ``tune.storage``."""

@dataclass(frozen=True)
class TrainingKeys:
    """The keys of the ``train_ldm`` params section a study reads, with their types (the train_ldm stage's options;
    tests/test_contract.py checks that they agree)."""

    lr: float
    channels: list[int]
    attention_levels: list[bool]
    num_res_blocks: int
    num_head_channels: int
    norm_num_groups: int
    num_train_timesteps: int
    schedule: str
    prediction_type: str
    latent_norm: str
    label_dropout: float
    min_snr_gamma: float
    ema_decay: float
    batch_size: int
    warmup_steps: int
    grad_clip: float


SEARCHED = ("lr", "channels", "attention_levels", "num_res_blocks")
"""The ``train_ldm`` keys a study searches (and that ``best_params.yaml`` sets for train_ldm)."""

FIXED = ("num_head_channels", "norm_num_groups", "num_train_timesteps", "schedule", "prediction_type", "latent_norm",
         "label_dropout", "min_snr_gamma", "ema_decay", "batch_size", "warmup_steps", "grad_clip")
"""The ``train_ldm`` keys every trial takes from params.yaml unchanged (the trials' seed is ``tune.seed``)."""

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def resolve_storage(param: str, default_file: Path) -> str:
    """The study's storage URL: ``$CXR_TUNE_STORAGE``, else ``tune.storage``, else an SQLite file."""
    return os.environ.get(STORAGE_ENV) or param or f"sqlite:///{default_file.resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage for any SQLAlchemy URL (SQLite, PostgreSQL, MySQL...).

    SQLite waits up to 2 min for a lock (several local workers write to one file); a heartbeat marks the trials of a
    worker that died as failed after 2 min, so the study goes on without them.
    """
    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": 120}} if sqlite else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120)
        except Exception as exc:  # SQLAlchemy raises many types (bad URL, missing driver, unreachable server)
            raise PipelineError(f"cannot open the study storage {url!r}: {exc}") from exc
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make every transaction on an SQLite engine take the database's write lock when it begins.

    Optuna claims a queued trial by reading its state and setting it to RUNNING in one transaction, with ``SELECT ...
    FOR UPDATE``, which SQLite ignores: two workers could both read WAITING and both run the trial (the second then
    crashed with ``UpdateFinishedTrialError`` when the first finished it). ``BEGIN IMMEDIATE`` makes the read and the
    write one step (SQLAlchemy's recipe for serializable pysqlite transactions); a worker waits for the lock instead.
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver no longer opens transactions itself ...

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # ... SQLAlchemy opens each one, holding the write lock

    engine.dispose()  # connections opened while Optuna created its tables are dropped; new ones get the listeners


def parse_channels(option: str) -> list[int]:
    """``"32,64,128"`` -> ``[32, 64, 128]``."""
    try:
        return [int(c) for c in option.split(",")]
    except ValueError:
        raise PipelineError(f"tune.channel_options entry {option!r} must be comma-separated integers") from None


def parse_attention(option: str) -> list[bool]:
    """``"011"`` -> ``[False, True, True]`` (one digit per U-Net level, highest resolution first)."""
    if not option or set(option) - {"0", "1"}:
        raise PipelineError(f"tune.attention_options entry {option!r} must be a string of 0/1, one per level")
    return [c == "1" for c in option]


def make_sampler(seed: int | None, n_startup_trials: int) -> optuna.samplers.TPESampler:
    """TPE (Bergstra et al., NeurIPS 2011) after ``n_startup_trials`` random trials."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)


def make_pruner(name: str, n_startup_trials: int, eval_every: int, steps: int) -> optuna.pruners.BasePruner:
    """``median`` (stop a trial below the median of earlier ones at the same step), ``hyperband``, or ``none``."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=eval_every)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_every, max_resource=steps)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise PipelineError(f"params key 'tune.pruner' must be median, hyperband or none, got {name!r}")


def ldm_values(trial_params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as the study records them -> the :data:`SEARCHED` ``ldm`` values (the inverse of
    :func:`_as_trial_params`)."""
    return {"lr": trial_params["lr"], "channels": parse_channels(trial_params["channels"]),
            "attention_levels": parse_attention(trial_params["attention_levels"]),
            "num_res_blocks": trial_params["num_res_blocks"]}


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """Draw the :data:`SEARCHED` ``ldm`` keys of one trial from ``space`` (the study's ``space`` attribute)."""
    return ldm_values({  # the order of the draws is the sampler's random stream: keep it
        "channels": trial.suggest_categorical("channels", space["channel_options"]),
        "attention_levels": trial.suggest_categorical("attention_levels", space["attention_options"]),
        "lr": trial.suggest_float("lr", *space["lr_range"], log=True),
        "num_res_blocks": trial.suggest_categorical("num_res_blocks", space["res_block_options"])})


def _as_trial_params(ldm: dict[str, Any]) -> dict[str, Any]:
    """``ldm`` values as the study's distributions spell them (for enqueueing the params.yaml defaults)."""
    return {"lr": ldm["lr"], "channels": ",".join(map(str, ldm["channels"])),
            "attention_levels": "".join("1" if a else "0" for a in ldm["attention_levels"]),
            "num_res_blocks": ldm["num_res_blocks"]}


def create_study(storage: optuna.storages.BaseStorage, name: str, space: dict[str, Any], fixed: dict[str, Any],
                 budget: dict[str, Any], defaults: dict[str, Any]) -> tuple[optuna.Study, bool]:
    """Create a new study holding the search space, fixed settings and budget; enqueue the params.yaml defaults as
    its first trial when they lie in the space, so the untuned settings are scored on the same objective.

    Returns:
        the study, and whether the defaults were enqueued.

    Raises:
        PipelineError: a study of that name already exists in the storage (a rerun must not mix with old trials).
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        raise PipelineError(f"a study named {name!r} already exists in this storage: set another tune.study_name, or "
                            f"delete it (optuna delete-study --study-name {name} --storage URL); to add workers to "
                            "it, use python -m pipeline.tune_worker") from None
    for key, value in {"space": space, "fixed": fixed, "budget": budget, "started_at": time.time()}.items():
        study.set_user_attr(key, value)
    wanted = _as_trial_params(defaults)
    in_space = (space["lr_range"][0] <= wanted["lr"] <= space["lr_range"][1]
                and wanted["channels"] in space["channel_options"]
                and wanted["attention_levels"] in space["attention_options"]
                and wanted["num_res_blocks"] in space["res_block_options"])
    if in_space:
        study.enqueue_trial(wanted, user_attrs={"origin": "params.yaml defaults"})
    return study, in_space


def _objective(trial: optuna.Trial, data: dict, attrs: dict[str, Any], worker: str, device: torch.device,
               progress: bool) -> float:
    space, fixed, budget = attrs["space"], attrs["fixed"], attrs["budget"]
    trial.set_user_attr("worker", worker)
    hp = suggest(trial, space)
    gen = seed_all(fixed["seed"])  # every trial starts from the same seed: differences come from hyperparameters
    args = unet_args(data["train"][0].shape[1], hp["channels"], hp["attention_levels"], hp["num_res_blocks"],
                     fixed["num_head_channels"], fixed["norm_num_groups"])
    sched = make_ddpm(scheduler_args(fixed["num_train_timesteps"], fixed["schedule"], fixed["prediction_type"]))
    unet = DiffusionModelUNet(**args).to(device)
    trial.set_user_attr("n_parameters", sum(p.numel() for p in unet.parameters()))
    last: dict[str, float] = {}

    def report(row: dict[str, float]) -> None:
        last.update(row)
        trial.report(row["val_loss"], int(row["step"]))
        if trial.should_prune():
            raise optuna.TrialPruned(f"val loss {row['val_loss']:.5f} at step {int(row['step'])}")

    t0 = time.time()
    try:
        fit(unet, sched, data["train"], data["val"], steps=budget["trial_steps"], eval_every=budget["eval_every"],
            batch_size=fixed["batch_size"], lr=hp["lr"],
            warmup_steps=min(fixed["warmup_steps"], budget["trial_steps"] // 10),
            grad_clip=fixed["grad_clip"], label_dropout=fixed["label_dropout"], ema_decay=fixed["ema_decay"],
            seed=fixed["seed"], gen=gen, device=device, min_snr_gamma=fixed["min_snr_gamma"],
            on_eval=report, progress=progress)
    except NonFiniteLoss as exc:
        trial.set_user_attr("failure", str(exc))
        return float("nan")  # Optuna records a NaN objective as a failed trial and the study goes on
    finally:
        trial.set_user_attr("train_seconds", round(time.time() - t0, 1))
    return last["val_loss"]


def _used(study: optuna.Study) -> int:
    """Trials that count against the budget: finished ones and those running or waiting now."""
    return len(study.get_trials(deepcopy=False, states=FINISHED + (optuna.trial.TrialState.RUNNING,)))


def run_worker(storage: optuna.storages.BaseStorage, name: str, latents: Path, index: int = 0,
               progress: bool = True, data: dict | None = None) -> list[int]:
    """Join study ``name`` and run trials until its budget (trials or minutes since the study began) is spent.

    Args:
        storage: where the study lives (several workers may share it).
        name: the study name.
        latents: the encode_latents folder (train/val latents and scale.json).
        index: this worker's index; its sampler is seeded with ``seed + index`` so that workers do not draw the same
            random start-up trials.
        progress: show a progress bar per trial.
        data: the train/val latents already loaded (:func:`pipeline.diffusion.latents.load_train_val`), else read
            here.

    Returns:
        the numbers of the trials this worker ran.

    Raises:
        PipelineError: the study does not exist.
    """
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise PipelineError(f"no study named {name!r} in the storage: start it with the tune stage first") from None
    attrs = study.user_attrs
    budget, fixed = attrs["budget"], attrs["fixed"]
    study.sampler = make_sampler(fixed["seed"] + index, budget["startup_trials"])
    study.pruner = make_pruner(budget["pruner"], budget["startup_trials"], budget["eval_every"],
                               budget["trial_steps"])
    if data is None:
        data, _, _ = load_train_val(latents, fixed["latent_norm"])
    device, worker = pick_device(), f"{socket.gethostname()}:{os.getpid()}"
    deadline = attrs["started_at"] + 60.0 * budget["timeout_min"] if budget["timeout_min"] > 0 else float("inf")
    ran: list[int] = []

    def done(s: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        ran.append(t.number)
        value = "" if t.value is None else f" val loss {t.value:.5f}"
        print(f"trial {t.number} {t.state.name.lower()}{value} after {t.user_attrs.get('train_seconds', 0)} s: "
              f"{t.params}", file=sys.stderr, flush=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while _used(study) < budget["n_trials"] and time.time() < deadline:
        study.optimize(lambda t: _objective(t, data, attrs, worker, device, progress), n_trials=1,
                       catch=(Exception,), callbacks=[done])
    return ran


def summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial, and the enqueued params.yaml defaults' value (None when not run or failed)."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in FINISHED}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    defaults = [t for t in trials if t.user_attrs.get("origin") == "params.yaml defaults"]
    return {"best": min(complete, key=lambda t: t.value) if complete else None,
            "n_complete": count[FINISHED[0]], "n_pruned": count[FINISHED[1]], "n_failed": count[FINISHED[2]],
            "defaults_value": defaults[0].value if defaults and defaults[0].state == FINISHED[0] else None}


def read_tuned(path: Path | None, use_tuned: bool) -> dict[str, Any]:
    """The :data:`SEARCHED` keys of the tune stage's ``best_params.yaml`` (type-checked), or {} when not used.

    Raises:
        PipelineError: ``use_tuned`` is on but the file is missing, or it holds an unknown key or a wrong type.
    """
    if not use_tuned or path is None:
        return {}
    if not path.is_file():
        raise PipelineError(f"tuned-parameters file {path} not found: run the tune stage (dvc repro tune), or set "
                            "train_ldm.use_tuned: false to train with params.yaml alone")
    tuned = (yaml.safe_load(path.read_text()) or {}).get("ldm") or {}
    types = typing.get_type_hints(TrainingKeys)
    try:
        check_keys("ldm", tuned, SEARCHED)
        for key, value in tuned.items():
            check_value(f"ldm.{key}", value, types[key])
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    return tuned
