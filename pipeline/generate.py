"""Generate chest X-rays of one class from the trained models into a folder (PNG and/or DICOM). Not a DVC stage.

Example:
    python -m pipeline.generate --label pneumonia -n 16 --out samples/

Image i uses seed ``seed + i``: the same seed gives the same image whatever ``-n`` or the batch size, so
``--seed 7 -n 1`` regenerates image 7 of a run started at seed 0. The sampler settings default to the cohorts' (the
``ldm`` section of ``--params``, params.yaml); after ``dvc pull`` no training is needed.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
import typer
from PIL import Image

from pipeline.core.cli import params_option, run_command
from pipeline.core.data import CLASSES, Label
from pipeline.core.runtime import pick_device
from pipeline.diffusion.sampler import Sampler
from pipeline.formats.dicom import write_synthetic_dicom

SECTION = "ldm"  # the sampler options take their defaults from this params.yaml section, as the cohorts are sampled

app = typer.Typer(add_completion=False, help=__doc__)


class Format(str, Enum):
    png = "png"
    dicom = "dicom"
    both = "both"


@app.command()
def main(
    label: Label = typer.Option(..., help="Clinical status of the images to generate."),
    n: int = typer.Option(16, "-n", "--n", min=1, help="How many images."),
    out: Path = typer.Option(..., help="Output folder (created if absent)."),
    fmt: Format = typer.Option(Format.png, "--format", help="png, dicom (synthetic Secondary Capture) or both."),
    seed: int = typer.Option(0, help="Image i uses seed seed + i."),
    params: Path = params_option(),
    guidance_scale: float = typer.Option(..., min=0.0, help="Classifier-free guidance scale (1 = none)."),
    guidance_max_t: list[int] = typer.Option(..., help="Per class (normal, then pneumonia; repeat the option): guide "
                                             "only at timesteps t <= this (guidance interval; 1000 = every step)."),
    num_inference_steps: int = typer.Option(..., "--num-inference-steps", "--steps", min=1, help="DDIM steps."),
    clip_denoised: float = typer.Option(..., min=0.0, help="Clamp DDIM's predicted clean latent to ±this at every "
                                        "step (normalised latent units; 0 = off)."),
    eta: float = typer.Option(..., min=0.0, help="DDIM stochasticity: 0 deterministic DDIM, 1 ancestral sampling on "
                              "the DDIM grid; the images still depend on their seeds only."),
    x0_spread: float = typer.Option(..., min=0.0, help="x0 spread factor (1 = off): at t >= --x0-spread-min-t each "
                                    "step starts from the class mean + this × (predicted clean latent − mean) "
                                    "(docs/method.md, \"The x0 spread\")."),
    x0_spread_min_t: int = typer.Option(..., min=0, help="The smallest timestep the x0 spread acts at."),
    sample_batch_size: int = typer.Option(..., "--batch-size", "--sample-batch-size", min=1,
                                          help="Images per batch (does not change the images)."),
    ldm: Path = typer.Option(Path("models/ldm"), help="Diffusion model folder."),
    autoencoder: Path = typer.Option(Path("models/autoencoder"), help="Autoencoder model folder."),
    latents: Path = typer.Option(Path("data/latents"), help="Latents folder: its train.npz gives the class means of "
                                 "the x0 spread (not read with --x0-spread 1)."),
) -> None:
    """Generate N images of the chosen class and write them as PNG and/or DICOM."""
    sampler = Sampler.with_spread(ldm, autoencoder, num_inference_steps, pick_device(), clip_denoised, eta,
                                  guidance_max_t, x0_spread, x0_spread_min_t, latents)
    labels = np.full(n, CLASSES.index(label.value), dtype=np.int64)
    seeds = [seed + i for i in range(n)]
    images = sampler.generate(labels, seeds, guidance_scale, sample_batch_size)
    out.mkdir(parents=True, exist_ok=True)
    if fmt in (Format.png, Format.both):
        for image, s in zip(images, seeds):
            Image.fromarray(image, mode="L").save(out / f"{label.value}_seed{s:06d}.png")
    if fmt in (Format.dicom, Format.both):
        desc = [f"label={label.value} seed={s} guidance={guidance_scale} guidance_max_t="
                f"{','.join(map(str, guidance_max_t))} ddim_steps={num_inference_steps} eta={eta:g}"
                f"{sampler.spread_label(compact=True)}" for s in seeds]
        write_synthetic_dicom(out / "dicom", images, [label.value] * n, desc)
    typer.echo(f"wrote {n} {label.value} images to {out}", err=True)


if __name__ == "__main__":
    run_command(app, SECTION)
