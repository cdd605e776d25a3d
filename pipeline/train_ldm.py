"""Stage ``train_ldm``: a class-conditional diffusion U-Net (MONAI core) on the scaled autoencoder latents.

Classifier-free guidance through a learned null class (``label_dropout``), epsilon or v prediction, linear warm-up then
cosine learning rate, gradient clipping, and an exponential moving average (EMA) of the weights, which is what is saved
and sampled from. A non-finite loss stops training with a clear error; the last good EMA weights are kept.
The loop is :func:`pipeline.diffusion.training.fit`. Reads the ``train_ldm`` section of params.yaml (the sampling keys
are the ``ldm`` section's, read by ``sample``); with ``use_tuned`` the keys found by the ``tune`` stage (its
``best_params.yaml``) replace the params.yaml values, and the log says which. With ``processes`` > 1 it trains
data-parallel under torchrun (:mod:`pipeline.core.distributed`): same recipe, weights checked identical on every rank.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import typer
from monai.networks.nets import DiffusionModelUNet

from pipeline.core.artifacts import atomic_outputs, save_model, seed_all, write_json, write_tsv
from pipeline.core.cli import PipelineError, params_option, run_stage
from pipeline.core.distributed import Ranks, train_on
from pipeline.core.optim import checkpoint_beside
from pipeline.diffusion.latents import load_train_val
from pipeline.diffusion.networks import unet_args, unet_precision
from pipeline.diffusion.schedule import make_ddpm, scheduler_args
from pipeline.diffusion.training import NonFiniteLoss, fit
from pipeline.diffusion.tune import read_tuned

SECTION = "train_ldm"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    latents: Path = typer.Option(..., help="Latents folder (output of encode_latents, with scale.json)."),
    out: Path = typer.Option(..., help="Output model folder (EMA weights + config.json)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (final train/val loss, wall time)."),
    curve: Path = typer.Option(..., help="Output TSV of per-epoch losses for dvc plots."),
    tuned: Path = typer.Option(None, help="best_params.yaml of the tune stage; its keys replace the params.yaml "
                               "ones when use_tuned is true."),
    params: Path = params_option(),
    use_tuned: bool = typer.Option(..., help="Take the keys the tune stage searched (learning rate, channels, "
                                   "attention levels, residual blocks) from --tuned instead of params.yaml."),
    channels: list[int] = typer.Option(..., help="U-Net channels per level."),
    attention_levels: list[bool] = typer.Option(..., help="Self-attention per level."),
    num_res_blocks: int = typer.Option(..., min=1, help="Residual blocks per level."),
    num_head_channels: int = typer.Option(..., min=1, help="Channels per attention head."),
    norm_num_groups: int = typer.Option(..., min=1, help="GroupNorm groups."),
    num_train_timesteps: int = typer.Option(..., min=2, help="Diffusion steps of the training schedule."),
    schedule: str = typer.Option(..., help="Beta schedule: linear_beta, scaled_linear_beta."),
    prediction_type: str = typer.Option(..., help="epsilon or v_prediction."),
    latent_norm: str = typer.Option(..., help="Latent normalisation: channel (each latent channel to zero "
                                    "mean, unit std) or global (one scale factor 1/std, as in Rombach et al.)."),
    label_dropout: float = typer.Option(..., min=0.0, max=1.0, help="P(label -> null class) in training."),
    min_snr_gamma: float = typer.Option(..., min=0.0, help="Min-SNR-γ loss weighting (Hang et al., ICCV 2023; "
                                        "5 in the paper); 0 = plain MSE. The val loss stays the plain MSE."),
    ema_decay: float = typer.Option(..., min=0.0, max=1.0, help="EMA decay of the weights."),
    epochs: int = typer.Option(..., min=1, help="Training epochs."),
    batch_size: int = typer.Option(..., min=1, help="Batch size."),
    lr: float = typer.Option(..., min=0.0, help="Peak learning rate (AdamW)."),
    warmup_steps: int = typer.Option(..., min=0, help="Linear warm-up steps."),
    grad_clip: float = typer.Option(..., min=0.0, help="Gradient-norm clip."),
    seed: int = typer.Option(..., help="Seed for weights, batches, noise and label dropout."),
    processes: int = typer.Option(..., min=1, help="Training processes (data-parallel with torchrun: gloo on the "
                                  "CPU, NCCL on CUDA, one GPU each); 1 trains in this process."),
) -> None:
    """Train the conditional latent diffusion U-Net; save its EMA weights, loss curve and metrics. A run killed midway
    resumes from its last finished epoch when rerun with the same settings (models/.ldm.checkpoint)."""
    options = {k: v for k, v in locals().items() if k not in ("params", "processes")}
    train_on(processes, "pipeline.train_ldm", "train_ldm.processes", lambda ranks: _train(**options, ranks=ranks))


def _train(*, latents: Path, out: Path, metrics: Path, curve: Path, tuned: Path | None, use_tuned: bool,
           channels: list[int], attention_levels: list[bool], num_res_blocks: int, num_head_channels: int,
           norm_num_groups: int, num_train_timesteps: int, schedule: str, prediction_type: str, latent_norm: str,
           label_dropout: float, min_snr_gamma: float, ema_decay: float, epochs: int, batch_size: int, lr: float,
           warmup_steps: int, grad_clip: float, seed: int, ranks: Ranks) -> None:
    """The training of :func:`main` in this process (one of ``ranks``; rank 0 writes)."""
    hp = {"channels": channels, "attention_levels": attention_levels, "num_res_blocks": num_res_blocks, "lr": lr}
    for key, value in read_tuned(tuned, use_tuned).items():
        if ranks.main:
            typer.echo(f"train_ldm.{key}: {hp.get(key)} (params.yaml) -> {value} (tuned, {tuned})", err=True)
        hp[key] = value
    if prediction_type not in ("epsilon", "v_prediction"):
        raise PipelineError(f"params key 'train_ldm.prediction_type' must be epsilon or v_prediction, got "
                            f"{prediction_type}")
    t0 = time.time()
    gen = seed_all(seed)
    device = ranks.device
    data, shift, scale = load_train_val(latents, latent_norm)
    args = unet_args(data["train"][0].shape[1], hp["channels"], hp["attention_levels"], hp["num_res_blocks"],
                     num_head_channels, norm_num_groups)
    sargs = scheduler_args(num_train_timesteps, schedule, prediction_type)
    sched = make_ddpm(sargs)
    unet = DiffusionModelUNet(**args).to(device)
    per_epoch = -(-len(data["train"][0]) // batch_size)
    rows: list[dict] = []
    settings = {"hp": hp, "args": args, "scheduler": sargs, "epochs": epochs, "batch_size": batch_size, "seed": seed,
                "warmup_steps": warmup_steps, "grad_clip": grad_clip, "label_dropout": label_dropout,
                "ema_decay": ema_decay, "min_snr_gamma": min_snr_gamma, "latent_norm": latent_norm}
    settings |= ranks.settings()
    # a killed run resumes from its last epoch
    checkpoint = checkpoint_beside(out, settings, latents, precision=unet_precision(device))

    def log(row: dict[str, float]) -> None:
        rows.append({"epoch": int(round(row["epoch"])), "train_loss": row["train_loss"], "val_loss": row["val_loss"],
                     "lr": row["lr"]})
        if ranks.main:
            typer.echo(f"epoch={rows[-1]['epoch']}/{epochs} train_loss={row['train_loss']:.5f} "
                       f"val_loss={row['val_loss']:.5f}", err=True)

    try:
        ema = fit(unet, sched, data["train"], data["val"], steps=epochs * per_epoch, eval_every=per_epoch,
                  batch_size=batch_size, lr=hp["lr"], warmup_steps=warmup_steps, grad_clip=grad_clip,
                  label_dropout=label_dropout, ema_decay=ema_decay, seed=seed, gen=gen, device=device,
                  min_snr_gamma=min_snr_gamma, on_eval=log, checkpoint=checkpoint, ranks=ranks)
    except NonFiniteLoss as exc:
        if ranks.main:
            _save(out, metrics, curve, exc.ema, args, sargs, shift, scale, rows, t0)
        raise PipelineError(f"{exc} (epoch {len(rows) + 1}). The last good EMA weights were saved to {out}") from None
    parallel = ranks.provenance(ema.module)
    if not ranks.main:
        return
    _save(out, metrics, curve, ema.module, args, sargs, shift, scale, rows, t0, lr=hp["lr"], epochs=epochs,
          batch_size=batch_size, warmup_steps=warmup_steps, label_dropout=label_dropout, ema_decay=ema_decay,
          min_snr_gamma=min_snr_gamma,
          tuned_from=str(tuned) if use_tuned and tuned is not None else None, **parallel)
    checkpoint.clear()


def _save(out: Path, metrics: Path, curve: Path, model: torch.nn.Module, args: dict, sargs: dict,
          shift: list[float], scale: list[float], rows: list[dict], t0: float, **extra: Any) -> None:
    """Write the model folder (weights, U-Net and scheduler arguments, latent normalisation), curve and metrics.
    Losses are null in the metrics when no epoch finished (JSON has no NaN)."""
    last = rows[-1] if rows else {"train_loss": None, "val_loss": None}
    with atomic_outputs(out, metrics, curve) as (tmp_out, tmp_metrics, tmp_curve):
        save_model(tmp_out, model, "DiffusionModelUNet", args, "train_ldm", scheduler=sargs, latent_shift=shift,
                   latent_scale=scale, latent_norm_source="encode_latents/scale.json", training=extra)
        write_tsv(tmp_curve, rows)
        write_json(tmp_metrics, {k: None if last[k] is None else round(last[k], 6) for k in ("train_loss", "val_loss")}
                   | {"epochs": len(rows), "wall_time_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    run_stage(app, SECTION)
