"""Conditional latent diffusion pieces shared by training, sampling and editing (MONAI core schedulers and U-Net).

Conditioning: class labels 0 = normal, 1 = pneumonia, and a learned null class 2 used for classifier-free guidance
(Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022): during training a label is replaced by the null class
with probability ``label_dropout``; at sampling the prediction is ``uncond + w · (cond − uncond)``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["NULL_CLASS", "LATENT_NORMS", "latent_normalizer", "to_model_space", "from_model_space", "unet_args",
           "scheduler_args", "make_ddpm", "make_ddim", "clip_denoised_latents", "ddim_step", "training_target",
           "snr_weights", "drop_labels", "guided_output"]

NULL_CLASS = 2
LATENT_NORMS = ("channel", "global")


def latent_normalizer(stats: dict[str, Any], mode: str) -> tuple[list[float], list[float]]:
    """Per-channel ``(shift, scale)`` that map autoencoder latents to what the diffusion model sees: (z − shift)·scale.

    Args:
        stats: the ``scale.json`` written by encode_latents.
        mode: ``"global"``: one scale factor 1/std for all channels, no shift (Rombach et al., CVPR 2022);
            ``"channel"``: each channel standardised by its own train mean and std, so that channels whose std is
            10× smaller than the others are not drowned by the noise early in the forward process.
    """
    c = stats["latent_shape"][0]
    if mode == "global":
        return [0.0] * c, [float(stats["scale_factor"])] * c
    if mode == "channel":
        return [float(m) for m in stats["channel_mean"]], [1.0 / float(s) for s in stats["channel_std"]]
    raise ValueError(f"latent normalisation must be one of {LATENT_NORMS}, got {mode!r}")


def _per_channel(values: list[float], z: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))


def to_model_space(z: torch.Tensor, shift: list[float], scale: list[float]) -> torch.Tensor:
    """Autoencoder latents N×C×… -> normalised latents (z − shift)·scale."""
    return (z - _per_channel(shift, z)) * _per_channel(scale, z)


def from_model_space(z: torch.Tensor, shift: list[float], scale: list[float]) -> torch.Tensor:
    """Inverse of :func:`to_model_space`."""
    return z / _per_channel(scale, z) + _per_channel(shift, z)


def unet_args(latent_channels: int, channels: list[int], attention_levels: list[bool], num_res_blocks: int,
              num_head_channels: int, norm_num_groups: int) -> dict[str, Any]:
    """Constructor arguments of a 2-D class-conditional :class:`DiffusionModelUNet` (keys are MONAI's names)."""
    if len(attention_levels) != len(channels):
        raise ValueError(f"attention_levels ({len(attention_levels)}) must have one entry per level "
                         f"of channels ({len(channels)})")
    return {
        "spatial_dims": 2, "in_channels": latent_channels, "out_channels": latent_channels,
        "channels": list(channels), "attention_levels": list(attention_levels), "num_res_blocks": num_res_blocks,
        "num_head_channels": num_head_channels, "norm_num_groups": norm_num_groups, "num_class_embeds": 3,
    }


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


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by :data:`NULL_CLASS` with probability ``p``."""
    mask = torch.rand(labels.shape, generator=generator) < p
    return torch.where(mask.to(labels.device), torch.full_like(labels, NULL_CLASS), labels)


def guided_output(unet: DiffusionModelUNet, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                  guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided prediction; a scale of 1 is the plain conditional prediction (one forward pass)."""
    t = t.expand(len(z)) if t.ndim == 0 else t
    if guidance_scale == 1.0:
        return unet(z, timesteps=t, class_labels=labels)
    null = torch.full_like(labels, NULL_CLASS)
    out = unet(torch.cat([z, z]), timesteps=torch.cat([t, t]), class_labels=torch.cat([labels, null]))
    cond, uncond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
