"""Training of the class-conditional diffusion U-Net on normalised latents: the loss, its validation, and the loop.

Classifier-free guidance through a learned null class (``label_dropout``), epsilon or v prediction, Min-SNR-γ loss
weights, linear warm-up then cosine learning rate, gradient clipping, and an exponential moving average (EMA) of the
weights, which is what is saved and sampled from. Used by the ``train_ldm`` stage (in one process or data-parallel,
:mod:`pipeline.core.distributed`) and by every trial of ``tune``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from pipeline.core.cli import PipelineError
from pipeline.core.distributed import SINGLE, Ranks
from pipeline.core.optim import Checkpoint
from pipeline.diffusion.guidance import drop_labels
from pipeline.diffusion.networks import unet_autocast
from pipeline.diffusion.schedule import snr_weights, training_target

__all__ = ["NonFiniteLoss", "ema_avg_fn", "lr_lambda", "diffusion_loss", "validation_loss", "fit"]


class NonFiniteLoss(PipelineError):
    """The training loss became NaN or infinite; ``ema`` holds the last good EMA model."""

    def __init__(self, message: str, ema: torch.nn.Module) -> None:
        super().__init__(message)
        self.ema = ema


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
                   gen: torch.Generator, min_snr_gamma: float = 0.0, ranks: Ranks = SINGLE) -> torch.Tensor:
    """MSE between the U-Net output and its target at random timesteps, with noise from ``gen``; each sample
    weighted by :func:`pipeline.diffusion.schedule.snr_weights` when ``min_snr_gamma`` > 0 (0 = the plain MSE).
    The U-Net runs under :func:`pipeline.diffusion.networks.unet_autocast` (float32 on the CPU, bfloat16 autocast
    on CUDA); the loss is float32. With several ``ranks`` the noise and timesteps of the whole batch are drawn and
    this rank computes its share, its mean scaled by :meth:`Ranks.loss_scale`."""
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, sched.num_train_timesteps, (len(z0),), generator=gen).to(z0.device)
    if ranks.world > 1:
        n, part = len(z0), ranks.share(len(z0))
        z0, noise, t, labels = z0[part], noise[part], t[part], labels[part]
        return ranks.loss_scale(n) * _loss(unet, sched, z0, noise, t, labels, min_snr_gamma)
    return _loss(unet, sched, z0, noise, t, labels, min_snr_gamma)


def _loss(unet: torch.nn.Module, sched, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
          min_snr_gamma: float) -> torch.Tensor:
    zt = sched.add_noise(original_samples=z0, noise=noise, timesteps=t)
    with unet_autocast(z0.device):
        out = unet(zt, timesteps=t, class_labels=labels).float()
    target = training_target(sched, z0, noise, t)
    if min_snr_gamma <= 0:
        return torch.nn.functional.mse_loss(out, target)
    per_sample = (out - target).pow(2).flatten(1).mean(1)
    return (snr_weights(sched, t, min_snr_gamma) * per_sample).mean()


@torch.inference_mode()
def validation_loss(model: torch.nn.Module, sched, z: torch.Tensor, y: torch.Tensor, seed: int,
                    device: torch.device, ranks: Ranks = SINGLE) -> float:
    """Conditional diffusion loss on ``z`` with fixed noise and timesteps (comparable across epochs and runs); with
    several ``ranks`` each computes its share of every chunk and the sum is gathered (the same number)."""
    gen = torch.Generator().manual_seed(seed)
    losses = [diffusion_loss(model, sched, z[i:i + 256].to(device), y[i:i + 256].to(device), gen, ranks=ranks).item()
              * len(z[i:i + 256]) for i in range(0, len(z), 256)]
    if ranks.world > 1:
        return ranks.sum(sum(losses)) / ranks.world / len(z)
    return sum(losses) / len(z)


def fit(unet: torch.nn.Module, sched, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
        *, steps: int, eval_every: int, batch_size: int, lr: float, warmup_steps: int, grad_clip: float,
        label_dropout: float, ema_decay: float, seed: int, gen: torch.Generator, device: torch.device,
        min_snr_gamma: float = 0.0, on_eval: Callable[[dict[str, float]], None] = lambda row: None,
        progress: bool = True, checkpoint: Checkpoint | None = None, ranks: Ranks = SINGLE) -> AveragedModel:
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
        checkpoint: where to keep the run's state after every validation; a saved state of the same run is resumed
            from (``on_eval`` is called again for its validations, in order), and the run's final weights equal an
            uninterrupted run's. Cleared by the caller once its outputs are written.
        ranks: the training processes (:mod:`pipeline.core.distributed`); with several, each computes its share of
            every batch, DDP averages the gradients, and only rank 0 shows progress and saves the checkpoint.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite; the exception carries the last good EMA model.
    """
    z_train, y_train = train
    model = ranks.wrap(unet)  # what the loss runs: DDP averages the ranks' gradients in backward
    ema = AveragedModel(unet, avg_fn=ema_avg_fn(ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, steps))
    per_pass = -(-len(z_train) // batch_size)
    order, total, count, start, history = None, 0.0, 0, 0, []
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        unet.load_state_dict(saved["unet"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        lr_sched.load_state_dict(saved["lr_sched"])
        gen.set_state(saved["gen"])
        order, start = saved["order"], int(saved["step"])
        for row in saved["history"]:
            history.append(row)
            on_eval(row)
    bar = tqdm(range(start, steps), desc="train_ldm", disable=not (progress and ranks.main), mininterval=2.0,
               initial=start, total=steps)
    for step in bar:
        if step % per_pass == 0:
            order = torch.randperm(len(z_train), generator=gen)
        unet.train()
        idx = order[(step % per_pass) * batch_size:(step % per_pass + 1) * batch_size]
        labels = drop_labels(y_train[idx], label_dropout, gen).to(device)
        loss = diffusion_loss(model, sched, z_train[idx].to(device), labels, gen, min_snr_gamma, ranks)
        seen = ranks.mean(loss)  # the whole batch's loss, on every rank: they stop together
        if not torch.isfinite(seen):
            raise NonFiniteLoss(f"loss became {seen.item()} at step {step + 1}; lower train_ldm.lr or raise "
                                "train_ldm.grad_clip", ema.module)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
        opt.step()
        lr_sched.step()
        ema.update_parameters(unet)
        total, count = total + seen.item(), count + 1
        bar.set_postfix(loss=f"{seen.item():.4f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "epoch": round((step + 1) / per_pass, 3), "train_loss": total / count,
                   "val_loss": validation_loss(ema.module.eval(), sched, *val, seed + 1, device, ranks),
                   "lr": lr_sched.get_last_lr()[0]}
            total, count = 0.0, 0
            history.append(row)
            on_eval(row)
            if checkpoint is not None and step + 1 < steps and ranks.main:
                checkpoint.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                 "lr_sched": lr_sched.state_dict(), "gen": gen.get_state(), "order": order,
                                 "step": step + 1, "history": history})
    return ema
