"""The generative networks (MONAI core): the autoencoder and the diffusion U-Net, their constructor arguments, and
batched inference helpers."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator

from pipeline.core.runtime import autocast, fast_matmul_dtype

__all__ = ["REGISTRY", "MixedPrecision", "unet_autocast", "unet_precision", "autoencoder_args", "unet_args", "kl_loss",
           "batched", "encode_mean", "reconstruct"]

REGISTRY: dict[str, type[torch.nn.Module]] = {
    "AutoencoderKL": AutoencoderKL,
    "DiffusionModelUNet": DiffusionModelUNet,
    "PatchDiscriminator": PatchDiscriminator,
}


def unet_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The precision the diffusion U-Net trains and samples in: float32 on the CPU, bfloat16 autocast on CUDA.

    Measured on an AMD EPYC with native bf16 (docs/experiments/2026-12-07-speed.md): a U-Net trained under bf16
    autocast scored FID vs train (N 4708) 15.48 against 11.70 in float32, and bf16 sampling of one model moved FID
    (N 1000) 24.02 -> 24.27, both more than the seed noise, so on the CPU the U-Net stays float32 however fast bf16
    is. On CUDA mixed precision is the usual practice; its effect on these metrics has not been measured here.
    ``$CXR_PRECISION=fp32`` turns it off there too.
    """
    return autocast(device, enabled=device.type == "cuda")


def unet_precision(device: torch.device) -> str:
    """The name of the arithmetic :func:`unet_autocast` gives the U-Net on ``device`` ("float32" or "bfloat16")."""
    dtype = fast_matmul_dtype(device) if device.type == "cuda" else None
    return str(dtype or torch.float32).removeprefix("torch.")


class MixedPrecision(torch.nn.Module):
    """A network run under :func:`unet_autocast` (float32 on the CPU, bfloat16 autocast on CUDA), its output
    returned in float32: what the sampler and the edits call the diffusion U-Net through. The autoencoder is not
    wrapped: bf16 would round its decoder's output by about one grey level."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        with unet_autocast(x.device if x is not None else torch.device("cpu")):
            return self.net(*args, **kwargs).float()


def autoencoder_args(channels: list[int], latent_channels: int, num_res_blocks: int,
                     norm_num_groups: int) -> dict[str, object]:
    """Constructor arguments of a 2-D, 1-channel :class:`AutoencoderKL` (its keys are MONAI's argument names).

    The latent grid is the input size divided by 2^(len(channels) - 1). Attention is off: at 16×16 latents it costs
    more CPU time than it buys.
    """
    return {
        "spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": list(channels),
        "latent_channels": latent_channels, "num_res_blocks": num_res_blocks,
        "attention_levels": [False] * len(channels), "norm_num_groups": norm_num_groups,
        "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
    }


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


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), summed over latent elements, averaged over the batch (Kingma & Welling 2014)."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


@torch.inference_mode()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in batches on ``device``; the result is gathered on the CPU."""
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def encode_mean(ae: AutoencoderKL, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Posterior means z_mu of images ``x`` (N×1×P×P in [0, 1])."""
    return batched(lambda b: ae.encode(b)[0], x, batch_size, device)


def reconstruct(ae: AutoencoderKL, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Deterministic reconstructions (decode of the posterior mean), clamped to [0, 1]."""
    return batched(lambda b: ae.decode(ae.encode(b)[0]).clamp(0, 1), x, batch_size, device)
