"""The noise schedules of training (DDPM) and sampling (DDIM), and what the U-Net is trained to predict (MONAI core
schedulers)."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["scheduler_args", "make_ddpm", "make_ddim", "clip_denoised_latents", "ddim_step", "training_target",
           "snr_weights"]


def scheduler_args(num_train_timesteps: int, schedule: str, prediction_type: str) -> dict[str, Any]:
    """Arguments shared by the DDPM (training) and DDIM (sampling) schedulers."""
    return {"num_train_timesteps": num_train_timesteps, "schedule": schedule, "prediction_type": prediction_type,
            "beta_start": 0.0015, "beta_end": 0.0195, "clip_sample": False}


def make_ddpm(args: dict[str, Any]) -> DDPMScheduler:
    """DDPM scheduler (Ho et al., NeurIPS 2020) from :func:`scheduler_args`."""
    return DDPMScheduler(**args)


def make_ddim(args: dict[str, Any], num_inference_steps: int, clip_denoised: float = 0.0) -> DDIMScheduler:
    """DDIM scheduler (Song et al., ICLR 2021) with the training betas, set to ``num_inference_steps`` steps, clamping
    its predicted clean latent as :func:`clip_denoised` says."""
    sched = DDIMScheduler(**args)
    sched.set_timesteps(num_inference_steps)
    return clip_denoised_latents(sched, clip_denoised)


def clip_denoised_latents(sched: DDIMScheduler | DDPMScheduler, clip: float) -> DDIMScheduler | DDPMScheduler:
    """Clamp the predicted clean latent x̂0 to [−clip, clip] (normalised latent units) at every sampling step; 0 = off.

    With epsilon prediction, x̂0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t amplifies the U-Net's error by 1/√ᾱ_t (84× at the last
    training step of the default schedule), so the first steps from pure noise predict latents far outside the data
    (std ≈ 7 where the data has 1) and the trajectory never comes back (the "static thresholding" of Saharia et al.,
    NeurIPS 2022, applied to normalised latents).
    """
    sched.clip_sample = clip > 0
    if clip > 0:
        sched.clip_sample_values = [-clip, clip]
    return sched


def ddim_step(sched: DDIMScheduler, out: torch.Tensor, t: int, z: torch.Tensor, eta: float,
              noise: torch.Tensor) -> torch.Tensor:
    """One stochastic DDIM step (Song et al., ICLR 2021, Eq. 12 with σ_t(η) of Eq. 16) for a whole batch, with the
    noise given instead of drawn: the update of MONAI's ``DDIMScheduler.step(out, t, z, eta)``, term for term, so that
    each image's noise can come from its own generator while the batch is stepped at once on the device.

    Args:
        sched: the DDIM scheduler (its prediction type and clamp of x̂0 apply).
        out: the (guided) U-Net output at ``t``; z: the latents at ``t``.
        eta: the stochasticity η (0 gives MONAI's deterministic step).
        noise: standard normal noise shaped like ``z``, on its device.
    """
    if sched.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"ddim_step supports epsilon and v_prediction, not {sched.prediction_type}")
    prev_t = t - sched.num_train_timesteps // sched.num_inference_steps
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    _, x0 = sched.step(out, t, z)  # MONAI's predicted clean latent, clamped as the scheduler says
    eps = out if sched.prediction_type == "epsilon" else a_t ** 0.5 * out + (1 - a_t) ** 0.5 * z
    std = eta * sched._get_variance(t, prev_t) ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps + std * noise


def training_target(sched: DDPMScheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the U-Net regresses: the noise (epsilon) or the velocity v = α·ε − σ·z0 (Salimans & Ho, ICLR 2022)."""
    if sched.prediction_type == "v_prediction":
        return sched.get_velocity(z0, noise, t)
    return noise


def snr_weights(sched: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights per sample (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", ICCV 2023): the loss at timestep t counts min(SNR(t), γ) times as much as an x0-prediction loss, so the
    nearly noise-free timesteps, which are easy and dominate the gradient of a plain epsilon loss, stop crowding out
    the rest. With SNR = ᾱ/(1 − ᾱ): epsilon target -> min(SNR, γ)/SNR, v target -> min(SNR, γ)/(SNR + 1).

    Args:
        sched: the training scheduler (its ᾱ and prediction type).
        t: timesteps of the batch (N,).
        gamma: the clamp γ (> 0; the paper's default is 5).
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    a = sched.alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if sched.prediction_type == "v_prediction" else clipped / snr
