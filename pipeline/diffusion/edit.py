"""Counterfactual editing with the conditional LDM: change a real image's clinical status and keep its anatomy.

An edit encodes a real image with the autoencoder, takes its latent part of the way up the diffusion process, then
denoises it back under the *target* label with classifier-free guidance, decodes and crops it. Two ways up:

- ``ddim_inversion``: the deterministic DDIM ODE run backwards (Song et al., "Denoising Diffusion Implicit Models",
  ICLR 2021, Sec. 4.3; Dhariwal & Nichol, NeurIPS 2021, App. F), guidance 1 under the source label (or the null
  label). Denoising the inverted latent under the *same* label gives the source back (up to the discretisation), so
  what changes is what the label changes. With ``inversion_guidance`` w > 1 the inversion runs the *guided* ODE of
  the source label instead, ``ε_∅ + w (ε_source − ε_∅)``: with w equal to the denoising's guidance, a null edit
  (target = source) retraces the same ODE back to the source.
- ``sdedit``: Gaussian noise added in one jump (Meng et al., "SDEdit", ICLR 2022); the noise is fresh, so the image
  keeps only its coarse layout.

The strength ``s`` in [0, 1] is the fraction of the schedule the edit goes up: 0 only encodes and decodes the image
(the autoencoder's reconstruction), 1 starts from (almost) pure noise.

Timesteps: MONAI's ``DDIMScheduler.step`` and ``reversed_step`` move by the stride ``T // n`` (``T`` training steps,
``n = num_inference_steps``), whereas ``set_timesteps`` spreads ``n`` timesteps by ``linspace(T - 1, 0, n)``, whose
spacing is not that stride. An edit therefore uses its own grid of multiples of the stride, ``t_j = j · stride`` for
``j = 0..k`` with ``k = round(s · n)`` (at most ``(T - 1) // stride``), where one ``reversed_step`` at ``t_j`` lands
exactly on ``t_{j+1}`` and one ``step`` at ``t_{j+1}`` lands exactly on ``t_j``. The inversion evaluates the U-Net at
``t_0 .. t_{k-1}`` and ends at ``t_k``; the denoising starts there, evaluates it at ``t_k .. t_1`` and ends at
``t_0 = 0``, where the clean latent started.

Spatial mask (DiffEdit, Couairon et al., "DiffEdit: Diffusion-based semantic image editing with mask guidance",
ICLR 2023, Sec. 3.2): with ``mask = diffedit`` the edit first estimates where the target and source labels disagree,
``|ε(z_t, target) − ε(z_t, source)|`` at the edit's top timestep, channel-averaged and averaged over a few noise
draws, smoothed (3×3 box), min-max normalised per image and thresholded into a binary mask on the latent grid. After
every denoising step, the latent outside the mask is replaced by the inversion's (or SDEdit's noised) source latent at
the same timestep, so that what lies outside (bones, soft tissue, borders) ends as the source latent itself (with a
``change_sigma`` > 0 the low-pass of the change spreads it about 3σ pixels past the mask's edge).

Smooth change: with ``change_sigma`` σ > 0 the decoded edit is not used as it is; its change to the source image,
``edit − source``, is low-pass filtered with a Gaussian of std σ pixels and added back to the source,
``source + G_σ * (edit − source)``. The edit then keeps the source's own detail finer than about σ (rib and vessel
edges, and the autoencoder's reconstruction error) and changes what varies over larger scales: haze, opacities and
the brightness of the lung fields. It is a filter of the change map in image space, applied after decoding, as
blended-diffusion edits paste the source back outside their mask (Avrahami et al., CVPR 2022), here by spatial
frequency instead of by region.

Clamping: when the sampler clamps the predicted clean latent (``clip_denoised``, see
:mod:`pipeline.diffusion.schedule`), only the denoising clamps; the inversion never does, since clamping would change
a real latent before any edit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import typer
from monai.networks.schedulers import DDIMScheduler
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from pipeline.core.cli import PipelineError
from pipeline.diffusion.guidance import NULL_CLASS, guided_output
from pipeline.diffusion.sampler import Sampler, ddim_denoise

__all__ = ["Guide", "Method", "InversionLabel", "GuidanceReference", "Mask", "StrengthRule", "EditSettings",
           "edit_timesteps", "invert", "invert_trajectory", "mask_seeds", "diffedit_mask", "denoise_from", "noise_to",
           "way_up", "way_down", "edit_latents", "Inversion",
           "smooth_change", "unclamped", "model_input", "edit_images", "edit_at", "guide_accepts", "edit_guided",
           "STRENGTH_HELP", "strength_option", "METHOD_OPTION", "STRENGTH_RULE_OPTION", "GUIDE_STRENGTHS_OPTION",
           "GUIDE_MARGIN_OPTION", "INVERSION_LABEL_OPTION", "GUIDANCE_SCALE_OPTION", "GUIDANCE_REFERENCE_OPTION",
           "MASK_OPTION", "MASK_THRESHOLD_OPTION", "MASK_NOISE_DRAWS_OPTION", "INVERSION_GUIDANCE_OPTION",
           "CLIP_DENOISED_OPTION", "CHANGE_SIGMA_OPTION", "NUM_INFERENCE_STEPS_OPTION", "SEED_OPTION"]


class Guide(Protocol):
    """What stops a guided edit: a classifier with a probability of pneumonia and a decision threshold (the
    ``train_guide`` stage's :class:`pipeline.evaluation.classifier.Evaluator` is one)."""

    threshold: float

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Probability of pneumonia of each image (N×P×P uint8)."""
        ...


class Method(str, Enum):
    """How an edit goes up the diffusion process."""

    ddim_inversion = "ddim_inversion"
    sdedit = "sdedit"


class InversionLabel(str, Enum):
    """The label the DDIM inversion is conditioned on: the source label, or the null class ("unconditional"; not
    called ``null``, which YAML reads as None)."""

    source = "source"
    unconditional = "unconditional"


class GuidanceReference(str, Enum):
    """What classifier-free guidance extrapolates from: the null class ("unconditional", the usual CFG) or the source
    label."""

    unconditional = "unconditional"
    source = "source"


class StrengthRule(str, Enum):
    """How far each edit goes: one ``fixed`` strength per direction, or per image ``guided`` by a second classifier
    (:func:`edit_guided`)."""

    fixed = "fixed"
    guided = "guided"


class Mask(str, Enum):
    """Where an edit may change the latent: everywhere (``none``), or inside a DiffEdit mask (``diffedit``)."""

    none = "none"
    diffedit = "diffedit"


@dataclass(frozen=True)
class EditSettings:
    """How to edit. Every field is required: the values come from params.yaml's ``counterfactual`` section (chosen on
    val: docs/counterfactuals.md), through the counterfactual stage's and the edit command's options.

    Args:
        strength: fraction of the schedule the edit goes up, in [0, 1].
        method: DDIM inversion or SDEdit.
        inversion_label: condition the inversion on the source label or on the null class (DDIM inversion only).
        guidance_scale: classifier-free guidance of the denoising towards the target label (1 = none).
        guidance_reference: the prediction guidance extrapolates from: ``unconditional``
            (``ε_∅ + w (ε_target − ε_∅)``, Ho & Salimans 2022) or ``source`` (``ε_source + w (ε_target − ε_source)``:
            only what differs between the two labels' predictions is amplified, and a null edit, target = source, is
            the plain inversion round trip).
        mask: ``none`` (the whole latent is denoised under the target) or ``diffedit`` (only inside a mask where the
            target and source labels' noise predictions disagree; outside, the source trajectory is kept).
        mask_threshold: a latent cell is inside the DiffEdit mask when its normalised disagreement (0 = least, 1 = most
            in that image) is at least this, in [0, 1]; lower = a larger mask.
        mask_noise_draws: noise draws the DiffEdit disagreement is averaged over (each costs one batched U-Net pass).
        inversion_guidance: classifier-free guidance of the DDIM inversion under ``inversion_label``, from the null
            class (1 = the plain conditional ODE; the guidance of the denoising = a null edit is the round trip of
            one ODE).
        change_sigma: std (pixels) of the Gaussian low-pass applied to the change ``edit − source`` before it is
            added to the source (:func:`smooth_change`); 0 keeps the decoded edit as it is.
    """

    strength: float
    method: Method
    inversion_label: InversionLabel
    guidance_scale: float
    guidance_reference: GuidanceReference
    mask: Mask
    mask_threshold: float
    mask_noise_draws: int
    inversion_guidance: float
    change_sigma: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise PipelineError(f"edit strength must be in [0, 1], got {self.strength}")
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise PipelineError(f"edit mask_threshold must be in [0, 1], got {self.mask_threshold}")
        if self.mask_noise_draws < 1:
            raise PipelineError(f"edit mask_noise_draws must be at least 1, got {self.mask_noise_draws}")
        if self.inversion_guidance < 0.0:
            raise PipelineError(f"edit inversion_guidance must be at least 0, got {self.inversion_guidance}")
        if self.change_sigma < 0.0:
            raise PipelineError(f"edit change_sigma must be at least 0, got {self.change_sigma}")


STRENGTH_HELP = ("the fraction of the diffusion schedule the edit goes up; higher changes more (0 = autoencoder round "
                 "trip, 1 = from noise).")


def strength_option(target: str) -> typer.models.OptionInfo:
    """The ``--strength-to-<target>`` option: edit strength t0 of the fixed rule's edits to ``target``."""
    return typer.Option(..., min=0.0, max=1.0, help=f"Fixed rule: edit strength t0 of edits to {target}: "
                        f"{STRENGTH_HELP} metrics/plots/counterfactual_sweep.png shows flip rate against SSIM per t0.")


# Command-line options of an edit, shared by the counterfactual stage and the edit command: one help text each; the
# values come from params.yaml's counterfactual section (the one source of every default).
METHOD_OPTION = typer.Option(..., help="ddim_inversion (deterministic, keeps the anatomy) or sdedit (fresh noise to "
                             "t0, then denoise).")
INVERSION_LABEL_OPTION = typer.Option(..., help="Label the DDIM inversion is conditioned on: source, or "
                                      "unconditional (the null class).")
GUIDANCE_SCALE_OPTION = typer.Option(..., min=0.0, help="Classifier-free guidance towards the target label "
                                     "(1 = none).")
GUIDANCE_REFERENCE_OPTION = typer.Option(
    ..., help="What guidance extrapolates from: unconditional (usual classifier-free guidance) or source (only what "
    "differs between the source and target predictions is amplified).")
MASK_OPTION = typer.Option(..., help="none (the whole image may change) or diffedit (only where the target and source "
                           "labels' noise predictions disagree; outside, the source latent is kept).")
MASK_THRESHOLD_OPTION = typer.Option(..., min=0.0, max=1.0, help="DiffEdit mask: cells whose normalised disagreement "
                                     "(0-1 per image) is at least this are edited; lower = larger.")
MASK_NOISE_DRAWS_OPTION = typer.Option(..., min=1, help="DiffEdit mask: noise draws the disagreement is averaged "
                                       "over.")
INVERSION_GUIDANCE_OPTION = typer.Option(..., min=0.0, help="Classifier-free guidance of the DDIM inversion under its "
                                         "label (1 = none; = --guidance-scale makes a null edit the round trip of one "
                                         "ODE).")
CHANGE_SIGMA_OPTION = typer.Option(..., min=0.0, help="Std (pixels of the model's 28-px image) of the Gaussian "
                                   "low-pass of the change (edit - source) added to the source: the edit keeps the "
                                   "source's detail finer than this and changes haze, opacities, brightness; 0 = off.")
STRENGTH_RULE_OPTION = typer.Option(..., help="fixed: every edit of a direction at its --strength-to-* t0; guided: "
                                    "each image at the smallest of --guide-strengths whose edit the guide classifier "
                                    "(train_guide) calls the target class.")
GUIDE_STRENGTHS_OPTION = typer.Option(..., help="Guided edits: the candidate strengths, tried from the smallest up "
                                      "(one option per value).")
GUIDE_MARGIN_OPTION = typer.Option(..., min=0.0, max=0.99, help="Guided edits: how clearly the guide must call the "
                                   "target, as the share of the way from its threshold to certainty (0 = its plain "
                                   "call).")
CLIP_DENOISED_OPTION = typer.Option(..., min=0.0, help="Clamp the predicted clean latent to ±this while denoising "
                                    "(normalised latent units, 0 = off; the inversion never clamps).")
NUM_INFERENCE_STEPS_OPTION = typer.Option(..., min=1, help="DDIM steps of a full schedule; an edit of strength t0 runs "
                                          "about t0 x this many steps up and as many down.")
SEED_OPTION = typer.Option(..., help="Seeds the noise: image i uses seed + i (SDEdit noise, DiffEdit mask draws, the "
                           "regenerate baseline); the counterfactual stage also draws its images with it.")


def edit_timesteps(scheduler: DDIMScheduler, strength: float) -> list[int]:
    """The grid ``t_0 = 0 < t_1 < … < t_k`` of an edit of ``strength`` (see the module docstring).

    Args:
        scheduler: a DDIM scheduler after ``set_timesteps(n)``.
        strength: fraction of the schedule, in [0, 1]; 0 gives ``[0]`` (no diffusion step).
    """
    n, big_t = scheduler.num_inference_steps, scheduler.num_train_timesteps
    stride = big_t // n
    k = min(int(np.floor(strength * n + 0.5)), (big_t - 1) // stride)  # round half up
    return [j * stride for j in range(k + 1)]


def unclamped(scheduler: DDIMScheduler) -> DDIMScheduler:
    """The same scheduler without clamping of the predicted clean latent (a shallow copy when it clamps)."""
    if not scheduler.clip_sample:
        return scheduler
    out = copy.copy(scheduler)
    out.clip_sample = False
    return out


def _t(t: int, z: torch.Tensor) -> torch.Tensor:
    return torch.full((len(z),), t, dtype=torch.long, device=z.device)


@torch.inference_mode()
def invert_trajectory(unet: torch.nn.Module, scheduler: DDIMScheduler, z: torch.Tensor, labels: torch.Tensor,
                      timesteps: list[int], guidance_scale: float = 1.0) -> list[torch.Tensor]:
    """DDIM inversion, every latent on the way: ``[z at timesteps[0], …, z at timesteps[-1]]``.

    Args:
        unet: the class-conditional diffusion U-Net.
        scheduler: its DDIM scheduler; ``timesteps`` must be multiples of its stride (:func:`edit_timesteps`).
        z: normalised latents N×C×h×w.
        labels: conditioning of each latent (0, 1 or :data:`~pipeline.diffusion.NULL_CLASS`).
        timesteps: the edit's grid, increasing.
        guidance_scale: classifier-free guidance from the null class (:func:`~pipeline.diffusion.guidance.guided_output`); 1 = one conditional
            pass per step.
    """
    out = [z]
    null = torch.full_like(labels, NULL_CLASS)
    for t in timesteps[:-1]:
        eps = guided_output(unet, out[-1], _t(t, z), labels, guidance_scale, null)
        out.append(scheduler.reversed_step(eps, t, out[-1])[0])
    return out


def invert(unet: torch.nn.Module, scheduler: DDIMScheduler, z: torch.Tensor, labels: torch.Tensor,
           timesteps: list[int], guidance_scale: float = 1.0) -> torch.Tensor:
    """DDIM inversion: clean latents at ``timesteps[0]`` -> latents at ``timesteps[-1]`` (the last latent of
    :func:`invert_trajectory`, same arguments)."""
    return invert_trajectory(unet, scheduler, z, labels, timesteps, guidance_scale)[-1]


@torch.inference_mode()
def denoise_from(unet: torch.nn.Module, scheduler: DDIMScheduler, z: torch.Tensor, labels: torch.Tensor,
                 guidance_scale: float, timesteps: list[int], reference: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, trajectory: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from latents at ``timesteps[-1]`` down to ``timesteps[0]``, with guidance.

    Args:
        unet: the class-conditional diffusion U-Net.
        scheduler: its DDIM scheduler; ``timesteps`` must be multiples of its stride (:func:`edit_timesteps`).
        z: noisy latents at ``timesteps[-1]``.
        labels: target labels (0 normal, 1 pneumonia).
        guidance_scale: classifier-free guidance scale (1 = plain conditional prediction).
        timesteps: the edit's grid, increasing.
        reference: labels guidance extrapolates from (:func:`~pipeline.diffusion.guidance.guided_output`); None =
            the null class.
        mask: N×1×h×w in [0, 1], where the edit may change the latent (DiffEdit); None = everywhere.
        trajectory: with a mask, the source latents at each of ``timesteps`` (:func:`invert_trajectory`); after the
            step that lands on ``timesteps[j]``, the latent becomes ``mask · z + (1 − mask) · trajectory[j]``.
    """
    if mask is not None and (trajectory is None or len(trajectory) != len(timesteps)):
        raise ValueError("a masked denoising needs the source trajectory, one latent per timestep")
    reference = torch.full_like(labels, NULL_CLASS) if reference is None else reference.to(labels.device)
    below = {t: j - 1 for j, t in enumerate(timesteps)}  # the step from timesteps[j] lands on timesteps[j - 1]

    def keep_outside(t: int, x: torch.Tensor) -> torch.Tensor:
        return torch.lerp(trajectory[below[t]], x, mask)

    return ddim_denoise(scheduler, z, timesteps[:0:-1],
                        lambda x, t: guided_output(unet, x, _t(t, x), labels, guidance_scale, reference),
                        after_step=keep_outside if mask is not None else None)


def noise_to(scheduler: DDIMScheduler, z: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """The forward process in one jump (SDEdit): ``sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε``; ``t = 0`` leaves ``z`` as is."""
    if t == 0:
        return z
    a = scheduler.alphas_cumprod[t].to(z.device, z.dtype)
    return a.sqrt() * z + (1 - a).sqrt() * noise.to(z.device, z.dtype)


def mask_seeds(seeds: list[int], draw: int) -> list[int]:
    """Seeds of the ``draw``-th DiffEdit noise draw, one per image, distinct from the images' own seeds."""
    return [int(np.random.SeedSequence([s, 1 + draw]).generate_state(1)[0]) for s in seeds]


@torch.inference_mode()
def diffedit_mask(unet: torch.nn.Module, scheduler: DDIMScheduler, z: torch.Tensor, source: torch.Tensor,
                  target: torch.Tensor, t: int, noises: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """The DiffEdit mask (Couairon et al., ICLR 2023, Sec. 3.2) of clean latents ``z``: N×1×h×w, 1 inside.

    Args:
        unet: the class-conditional diffusion U-Net.
        scheduler: its DDIM scheduler (for ``ᾱ_t``).
        z: clean normalised latents N×C×h×w.
        source: labels of the images.
        target: labels they are edited to.
        t: the timestep the disagreement is measured at (the edit's top timestep).
        noises: noise draws, each N×C×h×w; ``|ε(z_t, target) − ε(z_t, source)|`` is averaged over them.
        threshold: cells whose min-max normalised disagreement is at least this are inside.
    """
    diff = torch.zeros_like(z[:, :1])
    tt = _t(t, torch.cat([z, z]))
    for noise in noises:
        zt = noise_to(scheduler, z, noise, t)
        a, b = unet(torch.cat([zt, zt]), timesteps=tt, class_labels=torch.cat([target, source])).chunk(2)
        diff += (a - b).abs().mean(1, keepdim=True)
    diff = F.avg_pool2d(diff, 3, stride=1, padding=1, count_include_pad=False)  # DiffEdit smooths the map too
    lo, hi = diff.amin((1, 2, 3), keepdim=True), diff.amax((1, 2, 3), keepdim=True)
    return ((diff - lo) / (hi - lo).clamp_min(1e-12) >= threshold).to(z.dtype)


def way_up(sampler: Sampler, z: torch.Tensor, source: torch.Tensor, settings: EditSettings, ts: list[int],
           seeds: list[int]) -> list[torch.Tensor]:
    """The source latents at each of ``ts`` (an edit's grid): the DDIM inversion's trajectory, or for SDEdit the clean
    latents noised in one jump to each timestep with the images' own noise. The trajectory to a larger strength starts
    with the one to a smaller strength, so one way up serves edits of every strength up to its own."""
    if settings.method == Method.sdedit:
        noise = sampler.initial_noise(seeds)
        return [noise_to(sampler.scheduler, z, noise, t) for t in ts]
    unconditional = settings.inversion_label == InversionLabel.unconditional
    cond = torch.full_like(source, NULL_CLASS) if unconditional else source
    return invert_trajectory(sampler.unet, unclamped(sampler.scheduler), z, cond, ts, settings.inversion_guidance)


def way_down(sampler: Sampler, trajectory: list[torch.Tensor], source: torch.Tensor, target: torch.Tensor,
             settings: EditSettings, ts: list[int], seeds: list[int]) -> torch.Tensor:
    """From the top of ``trajectory`` (the latents at ``ts[-1]``) down to clean latents under ``target``, with
    guidance and, for DiffEdit, the mask (the source trajectory kept outside it)."""
    mask = None
    if settings.mask == Mask.diffedit and len(ts) > 1:
        z = trajectory[0]
        noises = [sampler.initial_noise(mask_seeds(seeds, d)).to(z.device) for d in range(settings.mask_noise_draws)]
        mask = diffedit_mask(sampler.unet, sampler.scheduler, z, source, target, ts[-1], noises,
                             settings.mask_threshold)
    reference = source if settings.guidance_reference == GuidanceReference.source else None
    return denoise_from(sampler.unet, sampler.scheduler, trajectory[len(ts) - 1], target, settings.guidance_scale, ts,
                        reference, mask, trajectory[:len(ts)])


def edit_latents(sampler: Sampler, z: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                 settings: EditSettings, seeds: list[int]) -> torch.Tensor:
    """Edit clean normalised latents from their ``source`` labels to ``target`` labels (:func:`way_up` to
    ``settings.strength``, then :func:`way_down`).

    Args:
        sampler: the trained models and the DDIM scheduler (``num_inference_steps`` sets the stride).
        z: clean normalised latents N×C×h×w (:meth:`Sampler.encode`).
        source: labels of the images the latents come from.
        target: labels to edit them to.
        settings: strength, method, inversion label, guidance and mask.
        seeds: one per latent, for the SDEdit noise (unused by DDIM inversion) and the DiffEdit mask's noise draws.

    Returns:
        Edited clean latents; strength 0 returns ``z`` itself.
    """
    ts = edit_timesteps(sampler.scheduler, settings.strength)
    source, target = source.to(z.device), target.to(z.device)
    return way_down(sampler, way_up(sampler, z, source, settings, ts, seeds), source, target, settings, ts, seeds)


def smooth_change(sources: np.ndarray, edits: np.ndarray, sigma: float) -> np.ndarray:
    """The source plus the Gaussian low-pass of the edit's change, ``source + G_σ * (edit − source)``.

    Args:
        sources: uint8 source images N×H×W.
        edits: uint8 edits of the same shape.
        sigma: std of the Gaussian in pixels, per image (reflected at the borders, never across images); 0 returns
            ``edits`` itself.

    Returns:
        uint8 N×H×W, rounded and clipped to [0, 255].
    """
    if sources.shape != edits.shape:
        raise ValueError(f"sources {sources.shape} and edits {edits.shape} differ in shape")
    if sigma <= 0:
        return edits
    change = edits.astype(np.float64) - sources
    smooth = gaussian_filter(change, sigma=(0.0, sigma, sigma), mode="reflect")  # sigma 0: not across images
    return np.clip(np.rint(sources + smooth), 0, 255).astype(np.uint8)


def model_input(images: np.ndarray, pad: list[int] | tuple[int, int]) -> torch.Tensor:
    """uint8 N×H×W images at the data size -> float N×1×P×P in [0, 1], reflect-padded by ``pad`` = (before, after)
    on both axes, as :func:`pipeline.data.pad_images` pads the prepared data."""
    before, after = pad
    padded = np.pad(images, ((0, 0), (before, after), (before, after)), mode="reflect")
    return torch.from_numpy(padded[:, None]).float().div_(255.0)


class Inversion:
    """The way up of a set of images (:func:`way_up`), computed once to the largest strength needed and shared by
    every edit of them: the guided search over strengths, the null edits and the strength sweep all start from it, so
    each image is inverted once, not once per strength tried.

    An edit from it equals :func:`edit_latents` at that strength up to float rounding (the batches differ).

    Args:
        sampler: the trained models and the DDIM scheduler.
        images: uint8 N×H×W at the data size, unpadded.
        source: source label per image (the inversion's label).
        settings: every edit setting; ``settings.strength`` is not used.
        max_strength: the largest strength any edit of these images will use.
        seeds: one per image (SDEdit noise, DiffEdit noise draws).
        batch_size: images per batch (no effect on the edits).
        desc: progress-bar label.
    """

    def __init__(self, sampler: Sampler, images: np.ndarray, source: np.ndarray, settings: EditSettings,
                 max_strength: float, seeds: list[int], batch_size: int, desc: str = "inversion") -> None:
        self.sampler, self.images, self.source, self.settings = sampler, images, np.asarray(source), settings
        self.seeds, self.batch_size = list(seeds), batch_size
        self.ts = edit_timesteps(sampler.scheduler, max_strength)
        parts = []
        for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
            sl = slice(i, i + batch_size)
            z = sampler.encode(model_input(images[sl], sampler.pad))
            src = torch.from_numpy(self.source[sl]).long().to(z.device)
            parts.append(way_up(sampler, z, src, settings, self.ts, self.seeds[sl]))
        self.trajectory = [torch.cat([p[j] for p in parts]) for j in range(len(self.ts))] if parts else []

    def edit(self, idx: np.ndarray, target: np.ndarray, strength: float, desc: str = "editing") -> np.ndarray:
        """uint8 edits of the images ``idx`` to the labels ``target`` (one per index) at ``strength``."""
        ts = edit_timesteps(self.sampler.scheduler, strength)
        if len(ts) > len(self.ts):
            raise ValueError(f"strength {strength} goes beyond the inversion's {len(self.ts) - 1} steps")
        idx, target = np.asarray(idx, np.int64), np.asarray(target)
        out = []
        for i in tqdm(range(0, len(idx), self.batch_size), desc=f"{desc} t0={strength:g}", unit="batch", leave=False):
            b = idx[i:i + self.batch_size]
            rows = torch.from_numpy(b)
            trajectory = [t[rows] for t in self.trajectory[:len(ts)]]
            src = torch.from_numpy(self.source[b]).long().to(trajectory[0].device)
            tgt = torch.from_numpy(target[i:i + self.batch_size]).long().to(trajectory[0].device)
            z = way_down(self.sampler, trajectory, src, tgt, self.settings, ts, [self.seeds[j] for j in b])
            out.append(smooth_change(self.images[b], self.sampler.decode(z), self.settings.change_sigma))
        return np.concatenate(out) if out else np.zeros((0, *self.images.shape[1:]), np.uint8)

    def edit_at(self, target: np.ndarray, strengths: np.ndarray, desc: str = "editing") -> np.ndarray:
        """Every image edited to ``target`` at its own strength (``strengths``, one per image)."""
        strengths = np.broadcast_to(np.asarray(strengths, np.float64), len(self.images))
        out = np.empty_like(self.images)
        for s in np.unique(strengths):
            idx = np.flatnonzero(strengths == s)
            out[idx] = self.edit(idx, np.asarray(target)[idx], float(s), desc)
        return out


def edit_images(sampler: Sampler, images: np.ndarray, source: np.ndarray, target: np.ndarray,
                settings: EditSettings, seeds: list[int], batch_size: int, desc: str = "editing") -> np.ndarray:
    """Edit uint8 images N×H×W (data size, unpadded) from ``source`` to ``target`` labels at ``settings.strength``;
    uint8 N×H×W out.

    Image i's edit depends only on the image, its labels, ``seeds[i]`` and the settings, not on the batch size. With
    ``settings.change_sigma`` > 0 the decoded edit's change is low-pass filtered (:func:`smooth_change`).
    """
    inversion = Inversion(sampler, images, source, settings, settings.strength, seeds, batch_size, f"{desc}, up")
    return inversion.edit(np.arange(len(images)), target, settings.strength, desc)


def edit_at(sampler: Sampler, images: np.ndarray, source: np.ndarray, target: np.ndarray, settings: EditSettings,
            strengths: np.ndarray, seeds: list[int], batch_size: int, desc: str = "editing") -> np.ndarray:
    """:func:`edit_images` with a strength per image (``settings.strength`` is not used), from one shared inversion."""
    strengths = np.broadcast_to(np.asarray(strengths, np.float64), len(images))
    top = float(strengths.max()) if len(images) else 0.0
    return Inversion(sampler, images, source, settings, top, seeds, batch_size, f"{desc}, up").edit_at(
        target, strengths, desc)


def guide_accepts(prob: np.ndarray, threshold: float, target: np.ndarray, margin: float) -> np.ndarray:
    """Whether a classifier calls each image the target class with a margin, per image.

    Args:
        prob: its P(pneumonia) per image.
        threshold: its decision threshold (pneumonia when ``prob >= threshold``).
        target: target label per image (0 normal, 1 pneumonia).
        margin: in [0, 1), the share of the way from the threshold to certainty the call must clear: pneumonia needs
            ``prob >= threshold + margin (1 − threshold)``, normal ``prob < threshold (1 − margin)``; 0 is the plain
            call.
    """
    if not 0.0 <= margin < 1.0:
        raise PipelineError(f"the guide margin must be in [0, 1), got {margin}")
    to_pneumonia = prob >= threshold + margin * (1.0 - threshold)
    to_normal = prob < threshold * (1.0 - margin)
    return np.where(target == 1, to_pneumonia, to_normal)


def edit_guided(sampler: Sampler, images: np.ndarray, source: np.ndarray, target: np.ndarray, settings: EditSettings,
                strengths: list[float] | tuple[float, ...], guide: Guide, margin: float, seeds: list[int],
                batch_size: int, desc: str = "editing",
                inversion: Inversion | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each image edited at the smallest of ``strengths`` whose edit the guide calls the target class.

    The strengths are tried in increasing order; an image leaves the search at the first strength whose edit the guide
    accepts (:func:`guide_accepts` with ``margin``), and takes the largest strength when none is accepted. Image i's
    edit is the one :func:`edit_images` gives it at its chosen strength with ``seeds[i]`` (``settings.strength`` is
    not used), so the guide only chooses how far each image goes, never what the edit draws.

    Args:
        sampler: the trained models and the DDIM scheduler.
        images: uint8 N×H×W at the data size, unpadded.
        source: source label per image.
        target: target label per image.
        settings: every edit setting but the strength.
        strengths: the candidate strengths, each in [0, 1].
        guide: the classifier that stops each image's search (not the evaluator the edits are judged by).
        margin: how clearly the guide must call the target (:func:`guide_accepts`).
        seeds: one per image (SDEdit noise, DiffEdit noise draws).
        batch_size: images per batch (no effect on the edits).
        desc: progress-bar label.
        inversion: the images' :class:`Inversion` to at least the largest strength, to share with other edits of
            them (made here when None).

    Returns:
        uint8 edits N×H×W and the strength each image was edited at (float N).
    """
    grid = sorted(set(float(s) for s in strengths))
    if not grid or any(not 0.0 <= s <= 1.0 for s in grid):
        raise PipelineError(f"guided edits need candidate strengths in [0, 1], got {list(strengths)}")
    inversion = inversion or Inversion(sampler, images, source, settings, grid[-1], seeds, batch_size, f"{desc}, up")
    out, chosen = np.empty_like(images), np.full(len(images), grid[-1])
    todo = np.arange(len(images))
    for s in grid:
        if not len(todo):
            break
        edits = inversion.edit(todo, target[todo], s, desc)
        done = guide_accepts(guide.predict_proba(edits), guide.threshold, target[todo], margin) | (s == grid[-1])
        out[todo[done]], chosen[todo[done]] = edits[done], s
        todo = todo[~done]
    return out, chosen
