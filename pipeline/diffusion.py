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

__all__ = ["NULL_CLASS", "unet_args", "scheduler_args", "make_ddpm", "make_ddim", "training_target",
           "drop_labels", "guided_output"]

NULL_CLASS = 2


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


def make_ddim(args: dict[str, Any], num_inference_steps: int) -> DDIMScheduler:
    """DDIM scheduler (Song et al., ICLR 2021) with the training betas, set to ``num_inference_steps`` steps."""
    sched = DDIMScheduler(**args)
    sched.set_timesteps(num_inference_steps)
    return sched


def training_target(sched: DDPMScheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the U-Net regresses: the noise (epsilon) or the velocity v = α·ε − σ·z0 (Salimans & Ho, ICLR 2022)."""
    if sched.prediction_type == "v_prediction":
        return sched.get_velocity(z0, noise, t)
    return noise


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
