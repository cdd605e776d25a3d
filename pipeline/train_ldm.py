"""Stage ``train_ldm``: a class-conditional diffusion U-Net (MONAI core) on the scaled autoencoder latents.

Classifier-free guidance through a learned null class (``label_dropout``), epsilon or v prediction, linear warm-up then
cosine learning rate, gradient clipping, and an exponential moving average (EMA) of the weights, which is what is saved
and sampled from. A non-finite loss stops training with a clear error; the last good EMA weights are kept.
Reads the training keys of the ``ldm`` section (the sampling keys belong to ``sample``); with ``use_tuned`` the keys
found by the ``tune`` stage (its ``best_params.yaml``) replace the params.yaml values, and the log says which.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import typer
import yaml
from monai.networks.nets import DiffusionModelUNet
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from pipeline.artifacts import atomic_outputs, save_model, seed_all, write_json, write_tsv
from pipeline.cli import PipelineError, load_section, params_option, run_stage
from pipeline.diffusion import (LATENT_NORMS, drop_labels, latent_normalizer, make_ddpm, scheduler_args,
                                snr_weights, to_model_space, training_target, unet_args)
from pipeline.models import pick_device

SECTION = "ldm"  # the params.yaml section this stage reads (shared with sample)
SIBLINGS = ("pipeline.sample",)
app = typer.Typer(add_completion=False, help=__doc__)


class NonFiniteLoss(PipelineError):
    """The training loss became NaN or infinite; ``ema`` holds the last good EMA model."""

    def __init__(self, message: str, ema: torch.nn.Module) -> None:
        super().__init__(message)
        self.ema = ema


def load_latents(folder: Path, split: str, shift: list[float], scale: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents N×C×h×w (see :func:`pipeline.diffusion.latent_normalizer`) and labels of one split."""
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the encode_latents stage first")
    with np.load(path) as z:
        return to_model_space(torch.from_numpy(z["latents"]), shift, scale), torch.from_numpy(z["labels"]).long()


def load_train_val(folder: Path, latent_norm: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                             list[float], list[float]]:
    """Train and val latents in model space, with the per-channel ``(shift, scale)`` that maps them there."""
    if latent_norm not in LATENT_NORMS:
        raise PipelineError(f"params key 'ldm.latent_norm' must be one of {', '.join(LATENT_NORMS)}, got {latent_norm}")
    scale_file = folder / "scale.json"
    if not scale_file.is_file():
        raise PipelineError(f"{scale_file} not found: run the encode_latents stage first")
    shift, scale = latent_normalizer(json.loads(scale_file.read_text()), latent_norm)
    return {split: load_latents(folder, split, shift, scale) for split in ("train", "val")}, shift, scale


def ema_avg_fn(decay: float):
    """EMA update with warm-up: the effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so the
    randomly initialised weights do not linger in the average of a short run (as in diffusers' EMAModel)."""
    def f(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return d * averaged + (1.0 - d) * current
    return f


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def diffusion_loss(unet: torch.nn.Module, sched, z0: torch.Tensor, labels: torch.Tensor,
                   gen: torch.Generator, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE between the U-Net output and its target at random timesteps, with noise from ``gen``; each sample
    weighted by :func:`pipeline.diffusion.snr_weights` when ``min_snr_gamma`` > 0 (0 = the plain MSE)."""
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, sched.num_train_timesteps, (len(z0),), generator=gen).to(z0.device)
    zt = sched.add_noise(original_samples=z0, noise=noise, timesteps=t)
    out, target = unet(zt, timesteps=t, class_labels=labels), training_target(sched, z0, noise, t)
    if min_snr_gamma <= 0:
        return torch.nn.functional.mse_loss(out, target)
    per_sample = (out - target).pow(2).flatten(1).mean(1)
    return (snr_weights(sched, t, min_snr_gamma) * per_sample).mean()


@torch.inference_mode()
def validation_loss(model: torch.nn.Module, sched, z: torch.Tensor, y: torch.Tensor, seed: int,
                    device: torch.device) -> float:
    """Conditional diffusion loss on ``z`` with fixed noise and timesteps (comparable across epochs and runs)."""
    gen = torch.Generator().manual_seed(seed)
    losses = [diffusion_loss(model, sched, z[i:i + 256].to(device), y[i:i + 256].to(device), gen).item()
              * len(z[i:i + 256]) for i in range(0, len(z), 256)]
    return sum(losses) / len(z)


def fit(unet: torch.nn.Module, sched, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
        *, steps: int, eval_every: int, batch_size: int, lr: float, warmup_steps: int, grad_clip: float,
        label_dropout: float, ema_decay: float, seed: int, gen: torch.Generator, device: torch.device,
        min_snr_gamma: float = 0.0, on_eval: Callable[[dict[str, float]], None] = lambda row: None,
        progress: bool = True) -> AveragedModel:
    """Train ``unet`` for ``steps`` AdamW steps (shuffled passes over ``train``) and return its EMA model.

    Args:
        unet: the U-Net, already on ``device``.
        sched: the DDPM scheduler of training (its prediction type sets the target).
        train, val: normalised latents and labels.
        steps: optimiser steps; the learning rate warms up linearly, then decays to 0 at ``steps`` (cosine).
        eval_every: steps between validation losses of the EMA weights (and after the last step).
        seed: seed of the fixed validation noise and timesteps (``seed + 1``, as train_ldm's per-epoch curve).
        min_snr_gamma: Min-SNR-γ weighting of the training loss (0 = off); the validation loss is always the plain
            MSE, so it stays comparable across weightings.
        gen: the generator of batch order, label dropout, noise and timesteps.
        on_eval: called with ``{"step", "epoch", "train_loss", "val_loss", "lr"}`` at each validation; it may raise
            (the tuning stage's pruner does) to stop training.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite; the exception carries the last good EMA model.
    """
    z_train, y_train = train
    ema = AveragedModel(unet, avg_fn=ema_avg_fn(ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, steps))
    per_pass = -(-len(z_train) // batch_size)
    order, total, count = None, 0.0, 0
    bar = tqdm(range(steps), desc="train_ldm", disable=not progress, mininterval=2.0)
    for step in bar:
        if step % per_pass == 0:
            order = torch.randperm(len(z_train), generator=gen)
        unet.train()
        idx = order[(step % per_pass) * batch_size:(step % per_pass + 1) * batch_size]
        labels = drop_labels(y_train[idx], label_dropout, gen).to(device)
        loss = diffusion_loss(unet, sched, z_train[idx].to(device), labels, gen, min_snr_gamma)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at step {step + 1}; lower ldm.lr or raise ldm.grad_clip",
                                ema.module)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
        opt.step()
        lr_sched.step()
        ema.update_parameters(unet)
        total, count = total + loss.item(), count + 1
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "epoch": round((step + 1) / per_pass, 3), "train_loss": total / count,
                   "val_loss": validation_loss(ema.module.eval(), sched, *val, seed + 1, device),
                   "lr": lr_sched.get_last_lr()[0]}
            total, count = 0.0, 0
            on_eval(row)
    return ema


def read_tuned(path: Path | None, use_tuned: bool) -> dict[str, Any]:
    """The ``ldm`` keys of the tune stage's ``best_params.yaml`` (type-checked), or {} when not used.

    Raises:
        PipelineError: ``use_tuned`` is on but the file is missing, or it holds an unknown key or a wrong type.
    """
    if not use_tuned or path is None:
        return {}
    if not path.is_file():
        raise PipelineError(f"tuned-parameters file {path} not found: run the tune stage (dvc repro tune), or set "
                            "ldm.use_tuned: false to train with params.yaml alone")
    tuned = (yaml.safe_load(path.read_text()) or {}).get("ldm") or {}
    try:
        load_section({"ldm": tuned}, "ldm", [app])
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    if "use_tuned" in tuned:
        raise PipelineError(f"{path}: 'ldm.use_tuned' cannot be tuned")
    return tuned


@app.command()
def main(
    latents: Path = typer.Option(..., help="Latents folder (output of encode_latents, with scale.json)."),
    out: Path = typer.Option(..., help="Output model folder (EMA weights + config.json)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (final train/val loss, wall time)."),
    curve: Path = typer.Option(..., help="Output TSV of per-epoch losses for dvc plots."),
    tuned: Path = typer.Option(None, help="best_params.yaml of the tune stage; its keys replace the params.yaml "
                               "ones when use_tuned is true."),
    params: Path = params_option(),
    use_tuned: bool = typer.Option(True, help="Take the keys the tune stage searched (learning rate, channels, "
                                   "attention levels, residual blocks) from --tuned instead of params.yaml."),
    channels: list[int] = typer.Option([64, 128, 256], help="U-Net channels per level."),
    attention_levels: list[bool] = typer.Option([False, True, True], help="Self-attention per level."),
    num_res_blocks: int = typer.Option(2, min=1, help="Residual blocks per level."),
    num_head_channels: int = typer.Option(32, min=1, help="Channels per attention head."),
    norm_num_groups: int = typer.Option(32, min=1, help="GroupNorm groups."),
    num_train_timesteps: int = typer.Option(1000, min=2, help="Diffusion steps of the training schedule."),
    schedule: str = typer.Option("scaled_linear_beta", help="Beta schedule: linear_beta, scaled_linear_beta."),
    prediction_type: str = typer.Option("epsilon", help="epsilon or v_prediction."),
    latent_norm: str = typer.Option("channel", help="Latent normalisation: channel (each latent channel to zero "
                                    "mean, unit std) or global (one scale factor 1/std, as in Rombach et al.)."),
    label_dropout: float = typer.Option(0.15, min=0.0, max=1.0, help="P(label -> null class) in training."),
    min_snr_gamma: float = typer.Option(0.0, min=0.0, help="Min-SNR-γ loss weighting (Hang et al., ICCV 2023; "
                                        "5 in the paper); 0 = plain MSE. The val loss stays the plain MSE."),
    ema_decay: float = typer.Option(0.999, min=0.0, max=1.0, help="EMA decay of the weights."),
    epochs: int = typer.Option(50, min=1, help="Training epochs."),
    batch_size: int = typer.Option(64, min=1, help="Batch size."),
    lr: float = typer.Option(5e-4, min=0.0, help="Peak learning rate (AdamW)."),
    warmup_steps: int = typer.Option(200, min=0, help="Linear warm-up steps."),
    grad_clip: float = typer.Option(1.0, min=0.0, help="Gradient-norm clip."),
    seed: int = typer.Option(0, help="Seed for weights, batches, noise and label dropout."),
) -> None:
    """Train the conditional latent diffusion U-Net; save its EMA weights, loss curve and metrics."""
    hp = {"channels": channels, "attention_levels": attention_levels, "num_res_blocks": num_res_blocks, "lr": lr}
    for key, value in read_tuned(tuned, use_tuned).items():
        typer.echo(f"ldm.{key}: {hp.get(key)} (params.yaml) -> {value} (tuned, {tuned})", err=True)
        hp[key] = value
    if prediction_type not in ("epsilon", "v_prediction"):
        raise PipelineError(f"params key 'ldm.prediction_type' must be epsilon or v_prediction, got {prediction_type}")
    t0 = time.time()
    gen = seed_all(seed)
    device = pick_device()
    data, shift, scale = load_train_val(latents, latent_norm)
    args = unet_args(data["train"][0].shape[1], hp["channels"], hp["attention_levels"], hp["num_res_blocks"],
                     num_head_channels, norm_num_groups)
    sargs = scheduler_args(num_train_timesteps, schedule, prediction_type)
    sched = make_ddpm(sargs)
    unet = DiffusionModelUNet(**args).to(device)
    per_epoch = -(-len(data["train"][0]) // batch_size)
    rows: list[dict] = []

    def log(row: dict[str, float]) -> None:
        rows.append({"epoch": int(round(row["epoch"])), "train_loss": row["train_loss"], "val_loss": row["val_loss"],
                     "lr": row["lr"]})
        typer.echo(f"epoch={rows[-1]['epoch']}/{epochs} train_loss={row['train_loss']:.5f} "
                   f"val_loss={row['val_loss']:.5f}", err=True)

    try:
        ema = fit(unet, sched, data["train"], data["val"], steps=epochs * per_epoch, eval_every=per_epoch,
                  batch_size=batch_size, lr=hp["lr"], warmup_steps=warmup_steps, grad_clip=grad_clip,
                  label_dropout=label_dropout, ema_decay=ema_decay, seed=seed, gen=gen, device=device,
                  min_snr_gamma=min_snr_gamma, on_eval=log)
    except NonFiniteLoss as exc:
        _save(out, metrics, curve, exc.ema, args, sargs, shift, scale, rows, t0)
        raise PipelineError(f"{exc} (epoch {len(rows) + 1}). The last good EMA weights were saved to {out}") from None
    _save(out, metrics, curve, ema.module, args, sargs, shift, scale, rows, t0, lr=hp["lr"], epochs=epochs,
          batch_size=batch_size, warmup_steps=warmup_steps, label_dropout=label_dropout, ema_decay=ema_decay,
          min_snr_gamma=min_snr_gamma,
          tuned_from=str(tuned) if use_tuned and tuned is not None else None)


def _save(out: Path, metrics: Path, curve: Path, model: torch.nn.Module, args: dict, sargs: dict,
          shift: list[float], scale: list[float], rows: list[dict], t0: float, **extra: Any) -> None:
    """Write the model folder (weights, U-Net and scheduler arguments, latent normalisation), curve and metrics.
    Losses are null in the metrics when no epoch finished (JSON has no NaN)."""
    last = rows[-1] if rows else {"train_loss": None, "val_loss": None}
    with atomic_outputs(out, metrics, curve) as (tmp_out, tmp_metrics, tmp_curve):
        save_model(tmp_out, model, "DiffusionModelUNet", args, scheduler=sargs, latent_shift=shift,
                   latent_scale=scale, latent_norm_source="encode_latents/scale.json", training=extra)
        write_tsv(tmp_curve, rows)
        write_json(tmp_metrics, {k: None if last[k] is None else round(last[k], 6) for k in ("train_loss", "val_loss")}
                   | {"epochs": len(rows), "wall_time_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    run_stage(app, SECTION, SIBLINGS)
