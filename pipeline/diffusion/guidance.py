"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022): class labels 0 = normal,
1 = pneumonia, and a learned null class used for guidance. During training a label is replaced by the null class with
probability ``label_dropout``; at sampling the prediction is ``ref + w · (cond − ref)``, ``ref`` the prediction under
the null class (or, for edits, under another reference label).
"""

from __future__ import annotations

import torch

__all__ = ["NULL_CLASS", "drop_labels", "guided_output"]

NULL_CLASS = 2


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by :data:`NULL_CLASS` with probability ``p``."""
    mask = torch.rand(labels.shape, generator=generator) < p
    return torch.where(mask.to(labels.device), torch.full_like(labels, NULL_CLASS), labels)


def guided_output(unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                  guidance_scale: float, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guided prediction ``ref + w (cond − ref)``: the one guidance formula of sampling and editing.

    Args:
        unet: the class-conditional diffusion U-Net.
        z: latents N×C×h×w at timestep ``t``.
        t: the timestep, a scalar tensor or one per latent.
        labels: the labels guided towards (``cond``).
        guidance_scale: w; 1 is the plain conditional prediction (one forward pass).
        reference: the labels of ``ref``; None = the null class (the usual classifier-free guidance). With the
            source label as reference (edits), only what differs between the two labels' predictions is amplified.
    """
    t = t.expand(len(z)) if t.ndim == 0 else t
    if guidance_scale == 1.0:
        return unet(z, timesteps=t, class_labels=labels)
    ref = torch.full_like(labels, NULL_CLASS) if reference is None else reference
    out = unet(torch.cat([z, z]), timesteps=torch.cat([t, t]), class_labels=torch.cat([labels, ref]))
    cond, uncond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
