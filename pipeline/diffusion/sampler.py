"""Sampling from the trained models: the sampler (the EMA diffusion U-Net, its DDIM schedule, the autoencoder's
decoder) and the one DDIM denoising loop that sampling, guided edits and the tests share.

Image i of a cohort starts from noise drawn with seed ``sample_seed + i``, and with ``eta`` > 0 (stochastic DDIM,
Song et al. ICLR 2021, Eq. 16; eta 1 is ancestral DDPM on the DDIM grid) the noise added at each step comes from a
generator of that image alone (:func:`step_seed`), so any image can be regenerated alone and a cohort does not depend
on the batch size. Guidance can act on each class only below a timestep of its own (``guidance_max_t``; the guidance
interval of Kynkäänniemi et al., NeurIPS 2024): above it the step uses the plain conditional prediction. At the
high-noise steps (t >= ``x0_spread_min_t``) the predicted clean latent can be spread away from its class's mean
training latent by the factor ``x0_spread`` (:meth:`Sampler.spread_correction`), against the variance the sampler's
own trajectories lose there (docs/method.md, "The x0 spread"). Latents are decoded by the autoencoder, cropped back to
the data size and quantised to uint8.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler
from tqdm import tqdm

from pipeline.core.artifacts import load_model
from pipeline.core.cli import PipelineError
from pipeline.core.data import CLASSES, crop, to_uint8
from pipeline.diffusion.guidance import guided_output
from pipeline.diffusion.latents import (CLASS_MEANS_FILE, class_mean_latents, from_model_space, load_class_means,
                                        to_model_space)
from pipeline.diffusion.networks import REGISTRY, MixedPrecision
from pipeline.diffusion.schedule import ddim_step, make_ddim

__all__ = ["SamplerSettings", "Sampler", "step_seed", "ddim_denoise", "label_matched"]


@dataclass(frozen=True)
class SamplerSettings:
    """How the cohorts are sampled: the sampler keys of the ``ldm`` params section that every stage sampling as the
    cohorts do reads (``guidance_sweep``; ``sample`` and ``generate`` take them as options). See :class:`Sampler`."""

    num_inference_steps: int
    clip_denoised: float
    eta: float
    guidance_max_t: list[int]
    x0_spread: float
    x0_spread_min_t: int


def ddim_denoise(scheduler: DDIMScheduler, z: torch.Tensor, timesteps: Sequence[int],
                 predict: Callable[[torch.Tensor, int], torch.Tensor], *, eta: float = 0.0,
                 noise: Callable[[], torch.Tensor] | None = None,
                 correction: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor] | None = None,
                 after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The DDIM reverse process (Song et al., ICLR 2021): one step from each of ``timesteps`` to the next lower one.

    Args:
        scheduler: the DDIM scheduler; a step at t lands on t − T // num_inference_steps.
        z: latents at ``timesteps[0]``.
        timesteps: decreasing timesteps, one U-Net evaluation each.
        predict: ``(z, t) -> U-Net output`` (guided, for the sampler and edits).
        eta: stochasticity (0 = deterministic DDIM); with eta > 0, ``noise()`` gives the step's standard normal
            noise shaped like ``z``.
        correction: ``(out, t, z) -> delta`` added to the step's result (the sampler's x0 spread).
        after_step: ``(t, z) -> z`` applied after the step from t (an edit's DiffEdit mask).

    Returns:
        The latents after the last step.
    """
    if eta > 0 and noise is None:
        raise ValueError("stochastic DDIM (eta > 0) needs a noise source")
    for t in timesteps:
        out = predict(z, t)
        delta = correction(out, t, z) if correction is not None else None
        if eta > 0:
            z = ddim_step(scheduler, out, t, z, eta, noise())
        else:
            z, _ = scheduler.step(out, t, z)
        if delta is not None:
            z = z + delta
        if after_step is not None:
            z = after_step(t, z)
    return z


def step_seed(seed: int) -> int:
    """Seed of the generator of image ``seed``'s per-step noise (stochastic DDIM), distinct from its initial noise
    (seed itself) and from the DiffEdit mask draws of :func:`pipeline.editing.mask_seeds`."""
    return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])


class Sampler:
    """The EMA diffusion U-Net, its DDIM schedule and the autoencoder's decoder, ready to make images.

    Args:
        ldm_dir: diffusion model folder; ae_dir: autoencoder folder.
        num_inference_steps: DDIM steps of a full schedule.
        device: where the networks run.
        clip_denoised: clamp of DDIM's predicted clean latent while sampling (0 = off).
        eta: DDIM stochasticity of :meth:`generate` (0 = deterministic DDIM, 1 = ancestral sampling on the DDIM grid).
            Edits (:mod:`pipeline.editing`) are always deterministic.
        guidance_max_t: per class (normal, pneumonia), the largest timestep at which :meth:`denoise` applies
            classifier-free guidance; above it, one conditional pass. None (or ``num_train_timesteps``) = every step.
        x0_spread: factor s of the x0 spread (1 = off): at the steps with t >= ``x0_spread_min_t`` :meth:`denoise`
            steps from ``m + s (x̂0 − m)`` instead of the predicted clean latent x̂0, m the image's class mean.
        x0_spread_min_t: the smallest timestep the spread acts at.
        class_means: the class means m, one normalised latent per class (:func:`class_mean_latents`); needed when
            ``x0_spread`` is not 1.
    """

    def __init__(self, ldm_dir: Path, ae_dir: Path, num_inference_steps: int, device: torch.device,
                 clip_denoised: float = 0.0, eta: float = 0.0, guidance_max_t: Sequence[int] | None = None,
                 x0_spread: float = 1.0, x0_spread_min_t: int = 0, class_means: torch.Tensor | None = None) -> None:
        if eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {eta}")
        if guidance_max_t is not None and (len(guidance_max_t) != len(CLASSES) or min(guidance_max_t) < 0):
            raise ValueError(f"guidance_max_t needs one timestep >= 0 per class {CLASSES}, got {list(guidance_max_t)}")
        if x0_spread <= 0:
            raise ValueError(f"x0_spread must be > 0 (1 = off), got {x0_spread}")
        if x0_spread != 1 and (class_means is None or len(class_means) != len(CLASSES)):
            raise ValueError(f"x0_spread {x0_spread} needs the class mean latents, one per class {CLASSES}")
        unet, self.config = load_model(ldm_dir, REGISTRY)
        self.unet = MixedPrecision(unet.to(device)).eval()  # float32 on the CPU, bf16 autocast on CUDA
        self.ae, ae_config = load_model(ae_dir, REGISTRY)
        self.ae.to(device)
        self.pad = ae_config["data"]["pad"]
        self.latent_size = ae_config["data"]["padded_size"] // 2 ** (len(ae_config["args"]["channels"]) - 1)
        self.scheduler = make_ddim(self.config["scheduler"], num_inference_steps, clip_denoised)
        self.num_inference_steps, self.clip_denoised, self.eta = num_inference_steps, clip_denoised, eta
        steps = self.config["scheduler"]["num_train_timesteps"]
        self.guidance_max_t = [int(t) for t in guidance_max_t] if guidance_max_t is not None else [steps] * len(CLASSES)
        self.shift, self.scale = self.config["latent_shift"], self.config["latent_scale"]
        self.device = device
        self.x0_spread, self.x0_spread_min_t = float(x0_spread), int(x0_spread_min_t)
        self.class_means = class_means.to(device) if class_means is not None else None
        self.guidance_scale: float | None = None  # the cohort's, when made by from_settings

    @classmethod
    def from_settings(cls, ldm_dir: Path, ae_dir: Path, settings: Path, device: torch.device) -> "Sampler":
        """The sampler exactly as the ``sample`` stage made the cohorts, from its ``settings.json``.

        Returns:
            the sampler; its ``guidance_scale`` attribute is the cohort's guidance scale.
        """
        if not settings.is_file():
            raise PipelineError(f"{settings} not found: run the sample stage first (dvc repro sample)")
        cohort = json.loads(settings.read_text())
        spread = cohort.get("x0_spread", 1.0)
        means = load_class_means(settings.parent / CLASS_MEANS_FILE) if spread != 1 else None
        sampler = cls(ldm_dir, ae_dir, cohort["num_inference_steps"], device, cohort["clip_denoised"], cohort["eta"],
                      cohort.get("guidance_max_t"), spread, cohort.get("x0_spread_min_t", 0), means)
        sampler.guidance_scale = float(cohort["guidance_scale"])
        return sampler

    @classmethod
    def with_spread(cls, ldm_dir: Path, ae_dir: Path, num_inference_steps: int, device: torch.device,
                    clip_denoised: float, eta: float, guidance_max_t: Sequence[int] | None, x0_spread: float,
                    x0_spread_min_t: int, latents: Path) -> "Sampler":
        """A sampler whose x0 spread, when on, is centred on the class means of the training latents in ``latents``
        (:func:`class_mean_latents`; not read with ``x0_spread`` 1). The other arguments are the constructor's.

        Raises:
            PipelineError: a bad sampler setting, or the latents or the model's config are missing.
        """
        means = class_mean_latents(latents, ldm_dir) if x0_spread != 1 else None
        try:
            return cls(ldm_dir, ae_dir, num_inference_steps, device, clip_denoised, eta, guidance_max_t, x0_spread,
                       x0_spread_min_t, means)
        except ValueError as exc:
            raise PipelineError(str(exc)) from None

    @classmethod
    def from_params(cls, ldm_dir: Path, ae_dir: Path, settings: SamplerSettings, device: torch.device,
                    latents: Path) -> "Sampler":
        """:meth:`with_spread` with the cohorts' :class:`SamplerSettings`."""
        return cls.with_spread(ldm_dir, ae_dir, settings.num_inference_steps, device, settings.clip_denoised,
                               settings.eta, settings.guidance_max_t, settings.x0_spread, settings.x0_spread_min_t,
                               latents)

    def spread_label(self, compact: bool = False) -> str:
        """The x0 spread in words for titles (``", x0 spread 1.03 at t >= 200"``), or as ``key=value`` for DICOM
        descriptions (``compact``: ``" x0_spread=1.03@t>=200"``); empty when the spread is off."""
        if self.x0_spread == 1:
            return ""
        if compact:
            return f" x0_spread={self.x0_spread:g}@t>={self.x0_spread_min_t}"
        return f", x0 spread {self.x0_spread:g} at t >= {self.x0_spread_min_t}"

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One latent of Gaussian noise per seed (each from its own generator)."""
        c = self.config["args"]["in_channels"]
        shape = (c, self.latent_size, self.latent_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def guides(self, labels: torch.Tensor, t: int) -> torch.Tensor:
        """Which images of the batch are guided at timestep ``t`` (their class's ``guidance_max_t`` is at least t)."""
        return torch.as_tensor(self.guidance_max_t, device=labels.device)[labels] >= t

    @torch.inference_mode()
    def step_output(self, z: torch.Tensor, labels: torch.Tensor, t: int, guidance_scale: float) -> torch.Tensor:
        """The U-Net's prediction at timestep ``t``: guided for the images whose class guides at t, the plain
        conditional prediction (one pass) for the others; each class's images go through the U-Net together."""
        on, tt = self.guides(labels, t), torch.as_tensor(t, device=self.device).long()
        if bool(on.all()):
            return guided_output(self.unet, z, tt, labels, guidance_scale)
        if not bool(on.any()):
            return guided_output(self.unet, z, tt, labels, 1.0)
        out = torch.empty_like(z)
        out[on] = guided_output(self.unet, z[on], tt, labels[on], guidance_scale)
        out[~on] = guided_output(self.unet, z[~on], tt, labels[~on], 1.0)
        return out

    @torch.inference_mode()
    def spread_correction(self, out: torch.Tensor, t: int, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the x0 spread adds to a DDIM step's result: √ᾱ_prev (s − 1)(x̂0 − m), so that the step goes from
        ``m + s (x̂0 − m)`` instead of x̂0 (the noise direction of the step stays the model's); zero below
        ``x0_spread_min_t`` or with s = 1.

        Args:
            out: the (guided) U-Net output at ``t``; z: the latents at ``t``; labels: class of each image.
        """
        if self.x0_spread == 1 or t < self.x0_spread_min_t:
            return torch.zeros_like(z)
        sched = self.scheduler
        prev_t = t - sched.num_train_timesteps // sched.num_inference_steps
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        _, x0 = sched.step(out, t, z)
        return a_prev ** 0.5 * (self.x0_spread - 1) * (x0 - self.class_means[labels])

    @torch.inference_mode()
    def denoise(self, z: torch.Tensor, labels: torch.Tensor, guidance_scale: float,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Run the DDIM reverse process (:func:`ddim_denoise`) from noise ``z`` to clean normalised latents.

        Args:
            z: initial noise N×C×h×w.
            labels: class of each image (0 normal, 1 pneumonia).
            guidance_scale: classifier-free guidance scale (within each class's ``guidance_max_t``).
            generators: with ``self.eta`` > 0, one CPU generator per image for the noise of each step (each image's
                trajectory then depends on its own generator only); ignored when eta is 0.
        """
        if self.eta > 0 and (generators is None or len(generators) != len(z)):
            raise ValueError("stochastic DDIM (eta > 0) needs one generator per image")
        z, labels = z.to(self.device), labels.to(self.device)

        def noise() -> torch.Tensor:  # each image's noise from its own CPU generator, stepped at once on the device
            return torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).to(self.device, z.dtype)

        return ddim_denoise(self.scheduler, z, [int(t) for t in self.scheduler.timesteps],
                            lambda x, t: self.step_output(x, labels, t, guidance_scale), eta=self.eta, noise=noise,
                            correction=lambda out, t, x: self.spread_correction(out, t, x, labels))

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Padded images N×1×P×P in [0, 1] -> normalised latents (the diffusion model's space)."""
        return to_model_space(self.ae.encode(x.to(self.device))[0], self.shift, self.scale)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 images N×H×W at the data size."""
        x = self.ae.decode(from_model_space(z, self.shift, self.scale)).cpu()
        return to_uint8(crop(x[:, 0], self.pad))

    def generate(self, labels: np.ndarray, seeds: list[int], guidance_scale: float, batch_size: int,
                 desc: str = "sampling") -> np.ndarray:
        """uint8 images N×H×W for ``labels`` (0/1), image i from seed ``seeds[i]``."""
        out = []
        for i in tqdm(range(0, len(labels), batch_size), desc=desc, unit="batch"):
            z = self.initial_noise(seeds[i:i + batch_size])
            gens = [torch.Generator().manual_seed(step_seed(s)) for s in seeds[i:i + batch_size]] if self.eta else None
            z = self.denoise(z, torch.from_numpy(labels[i:i + batch_size]).long(), guidance_scale, gens)
            out.append(self.decode(z))
        return np.concatenate(out) if out else np.zeros((0, 0, 0), np.uint8)


def label_matched(train_labels: np.ndarray) -> np.ndarray:
    """Labels of a cohort with the same class counts as the training set (normals first)."""
    return np.sort(train_labels).astype(np.int64)
