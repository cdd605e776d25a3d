"""Generate chest X-rays of one class from the trained models into a folder (PNG and/or DICOM). Not a DVC stage.

Example:
    python -m pipeline.generate --label pneumonia -n 16 --out samples/

Image i uses seed ``seed + i``: the same seed gives the same image whatever ``-n`` or the batch size, so
``--seed 7 -n 1`` regenerates image 7 of a run started at seed 0.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
import typer
from PIL import Image

from pipeline.cli import run_command
from pipeline.data import CLASSES
from pipeline.dicom import write_synthetic_dicom
from pipeline.models import pick_device
from pipeline.sample import Sampler

app = typer.Typer(add_completion=False, help=__doc__)


class Label(str, Enum):
    normal = "normal"
    pneumonia = "pneumonia"


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
    guidance_scale: float = typer.Option(2.0, min=0.0, help="Classifier-free guidance scale (1 = none; the cohorts "
                                         "use ldm.guidance_scale, 2)."),
    guidance_max_t: list[int] = typer.Option([1000, 600], help="Per class (normal, then pneumonia; repeat the "
                                             "option): guide only at timesteps t <= this (guidance interval; 1000 = "
                                             "every step; the cohorts use ldm.guidance_max_t)."),
    steps: int = typer.Option(40, min=1, help="DDIM steps."),
    clip_denoised: float = typer.Option(0.0, min=0.0, help="Clamp DDIM's predicted clean latent to ±this at every "
                                        "step (normalised latent units; 0 = off; the cohorts use ldm.clip_denoised)."),
    eta: float = typer.Option(1.0, min=0.0, help="DDIM stochasticity: 0 deterministic DDIM, 1 ancestral sampling on "
                              "the DDIM grid (the cohorts use ldm.eta); the images still depend on their seeds only."),
    x0_spread: float = typer.Option(1.03, min=0.0, help="x0 spread factor (1 = off): at t >= --x0-spread-min-t each "
                                    "step starts from the class mean + this × (predicted clean latent − mean); the "
                                    "cohorts use ldm.x0_spread (README, \"The x0 spread\")."),
    x0_spread_min_t: int = typer.Option(200, min=0, help="The smallest timestep the x0 spread acts at (the cohorts "
                                        "use ldm.x0_spread_min_t)."),
    batch_size: int = typer.Option(64, min=1, help="Images per batch (does not change the images)."),
    ldm: Path = typer.Option(Path("models/ldm"), help="Diffusion model folder."),
    autoencoder: Path = typer.Option(Path("models/autoencoder"), help="Autoencoder model folder."),
    latents: Path = typer.Option(Path("data/latents"), help="Latents folder: its train.npz gives the class means of "
                                 "the x0 spread (not read with --x0-spread 1)."),
) -> None:
    """Generate N images of the chosen class and write them as PNG and/or DICOM."""
    sampler = Sampler.with_spread(ldm, autoencoder, steps, pick_device(), clip_denoised, eta, guidance_max_t,
                                  x0_spread, x0_spread_min_t, latents)
    labels = np.full(n, CLASSES.index(label.value), dtype=np.int64)
    seeds = [seed + i for i in range(n)]
    images = sampler.generate(labels, seeds, guidance_scale, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    if fmt in (Format.png, Format.both):
        for image, s in zip(images, seeds):
            Image.fromarray(image, mode="L").save(out / f"{label.value}_seed{s:06d}.png")
    if fmt in (Format.dicom, Format.both):
        desc = [f"label={label.value} seed={s} guidance={guidance_scale} guidance_max_t="
                f"{','.join(map(str, guidance_max_t))} ddim_steps={steps} eta={eta:g}"
                f"{sampler.spread_label(compact=True)}" for s in seeds]
        write_synthetic_dicom(out / "dicom", images, [label.value] * n, desc)
    typer.echo(f"wrote {n} {label.value} images to {out}", err=True)


if __name__ == "__main__":
    run_command(app)
