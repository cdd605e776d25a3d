"""The diffusion model's space: autoencoder latents normalised per channel (or globally), how they are read, and the
class means the x0 spread of the sampler is centred on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.core.artifacts import load_npz
from pipeline.core.cli import PipelineError
from pipeline.core.data import CLASSES

__all__ = ["LATENT_NORMS", "CLASS_MEANS_FILE", "latent_normalizer", "to_model_space", "from_model_space", "scale_stats",
           "load_latents", "load_train_val", "class_mean_latents", "load_class_means"]

LATENT_NORMS = ("channel", "global")
CLASS_MEANS_FILE = "class_mean_latents.npz"  # beside a cohort's settings.json: the means its x0 spread used


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


def scale_stats(latents: torch.Tensor) -> dict[str, float | list[int] | list[float]]:
    """Global mean, std and scale factor (1/std) of train latents N×C×h×w, per-channel means and stds, and the
    latent shape C×h×w (the ``scale.json`` of ``encode_latents``)."""
    std = latents.std().item()
    return {"scale_factor": 1.0 / std, "latent_std": std, "latent_mean": latents.mean().item(),
            "latent_shape": list(latents.shape[1:]),
            "channel_mean": latents.mean(dim=(0, 2, 3)).tolist(), "channel_std": latents.std(dim=(0, 2, 3)).tolist()}


def load_latents(folder: Path, split: str, shift: list[float], scale: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents N×C×h×w (see :func:`latent_normalizer`) and labels of one split."""
    z = load_npz(folder / f"{split}.npz", ("latents", "labels"), "encode_latents")
    return to_model_space(torch.from_numpy(z["latents"]), shift, scale), torch.from_numpy(z["labels"]).long()


def load_train_val(folder: Path, latent_norm: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                             list[float], list[float]]:
    """Train and val latents in model space, with the per-channel ``(shift, scale)`` that maps them there."""
    if latent_norm not in LATENT_NORMS:
        raise PipelineError(f"params key 'train_ldm.latent_norm' must be one of {', '.join(LATENT_NORMS)}, "
                            f"got {latent_norm}")
    scale_file = folder / "scale.json"
    if not scale_file.is_file():
        raise PipelineError(f"{scale_file} not found: run the encode_latents stage first")
    shift, scale = latent_normalizer(json.loads(scale_file.read_text()), latent_norm)
    return {split: load_latents(folder, split, shift, scale) for split in ("train", "val")}, shift, scale


def class_mean_latents(latents: Path, ldm_dir: Path) -> torch.Tensor:
    """The mean normalised training latent of each class (the diffusion model's space), the centres of the x0 spread.

    Args:
        latents: latents folder (``encode_latents``' output; its ``train.npz``).
        ldm_dir: diffusion model folder (its ``config.json`` has the latent shift and scale).

    Returns:
        float tensor K×C×h×w, K = len(CLASSES).
    """
    path = latents / "train.npz"
    if not path.is_file():
        raise PipelineError(f"{path} not found: the x0 spread needs the training latents (dvc repro encode_latents), "
                            "or turn it off (x0_spread 1)")
    config_path = ldm_dir / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"{config_path} not found: train the diffusion model first (dvc repro train_ldm)")
    config = json.loads(config_path.read_text())
    z = load_npz(path, ("latents", "labels"), "encode_latents")
    lat, labels = torch.from_numpy(z["latents"]).float(), z["labels"]
    lat = to_model_space(lat, config["latent_shift"], config["latent_scale"])
    return torch.stack([lat[torch.from_numpy(labels == k)].mean(0) for k in range(len(CLASSES))])


def load_class_means(path: Path) -> torch.Tensor:
    """Class mean latents saved beside a cohort's settings (:data:`CLASS_MEANS_FILE`)."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: the cohort's x0 spread needs it; rerun the sample stage")
    return torch.from_numpy(load_npz(path, ("class_means",), "sample")["class_means"])
