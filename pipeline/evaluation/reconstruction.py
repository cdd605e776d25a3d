"""How faithful the autoencoder's reconstructions are: PSNR, SSIM and MAE of unpadded images in [0, 1]."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pipeline.core.data import crop, to_uint8
from pipeline.diffusion.networks import reconstruct

__all__ = ["fidelity", "reconstruct_unpadded"]


def fidelity(recon: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB), SSIM (11×11 Gaussian window, σ 1.5) and MAE of images in [0, 1], N×1×H×W."""
    psnr = peak_signal_noise_ratio(recon, real, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(recon, real, data_range=1.0, reduction="none")
    return {"psnr_db": psnr.mean().item(), "ssim": ssim.mean().item(), "mae": (recon - real).abs().mean().item()}


def reconstruct_unpadded(ae: torch.nn.Module, x: torch.Tensor, pad: list[int],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, reconstructed) unpadded images, N×1×H×W in [0, 1]; reconstructions are quantised to uint8 levels,
    as they would be stored."""
    recon = reconstruct(ae, x, 256, device)
    return crop(x, pad), torch.from_numpy(to_uint8(crop(recon, pad))).float() / 255.0
