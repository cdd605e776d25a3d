"""Stage ``train_ldm``: a class-conditional diffusion U-Net (MONAI core) on the scaled autoencoder latents.

Classifier-free guidance through a learned null class (``label_dropout``), epsilon or v prediction, linear warm-up then
cosine learning rate, gradient clipping, and an exponential moving average (EMA) of the weights, which is what is saved
and sampled from. A non-finite loss stops training with a clear error; the last good EMA weights are kept.
Reads the training keys of the ``ldm`` section (the sampling keys belong to ``sample``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import typer
from monai.networks.nets import DiffusionModelUNet
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from pipeline.artifacts import atomic_outputs, save_model, seed_all, write_json, write_tsv
from pipeline.cli import PipelineError, params_option, run_stage
from pipeline.diffusion import (LATENT_NORMS, drop_labels, latent_normalizer, make_ddpm, scheduler_args,
                                to_model_space, training_target, unet_args)
from pipeline.models import pick_device

SECTION = "ldm"  # the params.yaml section this stage reads (shared with sample)
SIBLINGS = ("pipeline.sample",)
app = typer.Typer(add_completion=False, help=__doc__)


def load_latents(folder: Path, split: str, shift: list[float], scale: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents N×C×h×w (see :func:`pipeline.diffusion.latent_normalizer`) and labels of one split."""
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the encode_latents stage first")
    with np.load(path) as z:
        return to_model_space(torch.from_numpy(z["latents"]), shift, scale), torch.from_numpy(z["labels"]).long()


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
                   gen: torch.Generator) -> torch.Tensor:
    """MSE between the U-Net output and its target at random timesteps, with noise from ``gen``."""
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, sched.num_train_timesteps, (len(z0),), generator=gen).to(z0.device)
    zt = sched.add_noise(original_samples=z0, noise=noise, timesteps=t)
    return torch.nn.functional.mse_loss(unet(zt, timesteps=t, class_labels=labels),
                                        training_target(sched, z0, noise, t))


@torch.inference_mode()
def validation_loss(model: torch.nn.Module, sched, z: torch.Tensor, y: torch.Tensor, seed: int,
                    device: torch.device) -> float:
    """Conditional diffusion loss on ``z`` with fixed noise and timesteps (comparable across epochs and runs)."""
    gen = torch.Generator().manual_seed(seed)
    losses = [diffusion_loss(model, sched, z[i:i + 256].to(device), y[i:i + 256].to(device), gen).item()
              * len(z[i:i + 256]) for i in range(0, len(z), 256)]
    return sum(losses) / len(z)


@app.command()
def main(
    latents: Path = typer.Option(..., help="Latents folder (output of encode_latents, with scale.json)."),
    out: Path = typer.Option(..., help="Output model folder (EMA weights + config.json)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (final train/val loss, wall time)."),
    curve: Path = typer.Option(..., help="Output TSV of per-epoch losses for dvc plots."),
    params: Path = params_option(),
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
    ema_decay: float = typer.Option(0.999, min=0.0, max=1.0, help="EMA decay of the weights."),
    epochs: int = typer.Option(50, min=1, help="Training epochs."),
    batch_size: int = typer.Option(64, min=1, help="Batch size."),
    lr: float = typer.Option(5e-4, min=0.0, help="Peak learning rate (AdamW)."),
    warmup_steps: int = typer.Option(200, min=0, help="Linear warm-up steps."),
    grad_clip: float = typer.Option(1.0, min=0.0, help="Gradient-norm clip."),
    seed: int = typer.Option(0, help="Seed for weights, batches, noise and label dropout."),
) -> None:
    """Train the conditional latent diffusion U-Net; save its EMA weights, loss curve and metrics."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise PipelineError(f"params key 'ldm.prediction_type' must be epsilon or v_prediction, got {prediction_type}")
    if latent_norm not in LATENT_NORMS:
        raise PipelineError(f"params key 'ldm.latent_norm' must be one of {', '.join(LATENT_NORMS)}, got {latent_norm}")
    t0 = time.time()
    gen = seed_all(seed)
    device = pick_device()
    norm = dict(zip(("latent_shift", "latent_scale"),
                    latent_normalizer(json.loads((latents / "scale.json").read_text()), latent_norm)))
    z_train, y_train = load_latents(latents, "train", **_norm_kwargs(norm))
    z_val, y_val = load_latents(latents, "val", **_norm_kwargs(norm))
    args = unet_args(z_train.shape[1], channels, attention_levels, num_res_blocks, num_head_channels,
                     norm_num_groups)
    sargs = scheduler_args(num_train_timesteps, schedule, prediction_type)
    sched = make_ddpm(sargs)
    unet = DiffusionModelUNet(**args).to(device)
    ema = AveragedModel(unet, avg_fn=ema_avg_fn(ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    steps_per_epoch = -(-len(z_train) // batch_size)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, epochs * steps_per_epoch))
    rows: list[dict] = []
    for epoch in range(epochs):
        unet.train()
        order, total = torch.randperm(len(z_train), generator=gen), 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for i in bar:
            idx = order[i * batch_size:(i + 1) * batch_size]
            labels = drop_labels(y_train[idx], label_dropout, gen).to(device)
            loss = diffusion_loss(unet, sched, z_train[idx].to(device), labels, gen)
            if not torch.isfinite(loss):
                _save(out, metrics, curve, ema.module, args, sargs, norm, rows, t0)
                raise PipelineError(f"loss became {loss.item()} at epoch {epoch + 1}, step {i}; lower ldm.lr or "
                                    f"raise ldm.grad_clip. The last good EMA weights were saved to {out}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
            opt.step()
            lr_sched.step()
            ema.update_parameters(unet)
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        row = {"epoch": epoch + 1, "train_loss": total / steps_per_epoch,
               "val_loss": validation_loss(ema.module.eval(), sched, z_val, y_val, seed + 1, device),
               "lr": lr_sched.get_last_lr()[0]}
        rows.append(row)
        typer.echo(f"epoch={row['epoch']} train_loss={row['train_loss']:.5f} val_loss={row['val_loss']:.5f}",
                   err=True)
    _save(out, metrics, curve, ema.module, args, sargs, norm, rows, t0)


def _norm_kwargs(norm: dict[str, list[float]]) -> dict[str, list[float]]:
    return {"shift": norm["latent_shift"], "scale": norm["latent_scale"]}


def _save(out: Path, metrics: Path, curve: Path, model: torch.nn.Module, args: dict, sargs: dict,
          norm: dict[str, list[float]], rows: list[dict], t0: float) -> None:
    """Write the model folder (weights, U-Net and scheduler arguments, latent normalisation), curve and metrics.
    Losses are null in the metrics when no epoch finished (JSON has no NaN)."""
    last = rows[-1] if rows else {"train_loss": None, "val_loss": None}
    with atomic_outputs(out, metrics, curve) as (tmp_out, tmp_metrics, tmp_curve):
        save_model(tmp_out, model, "DiffusionModelUNet", args, scheduler=sargs, **norm,
                   latent_norm_source="encode_latents/scale.json")
        write_tsv(tmp_curve, rows)
        write_json(tmp_metrics, {k: None if last[k] is None else round(last[k], 6) for k in ("train_loss", "val_loss")}
                   | {"epochs": len(rows), "wall_time_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    run_stage(app, SECTION, SIBLINGS)
