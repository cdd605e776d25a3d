"""Stage ``sample`` (sample cohorts): the label-matched and balanced synthetic cohorts, with DDIM and classifier-free
guidance (:class:`pipeline.diffusion.sampler.Sampler`: image i from seed ``sample_seed + i``, so a cohort does not
depend on the batch size). Reads the ``ldm`` section of params.yaml, the sampling keys (the training keys are the
``train_ldm`` section's), so ``dvc exp run -S ldm.guidance_scale=4`` reruns sampling and what follows, never training.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from pipeline.core.artifacts import atomic_outputs, save_npz, write_json
from pipeline.core.cli import params_option, run_stage
from pipeline.core.data import CLASSES
from pipeline.core.runtime import pick_device
from pipeline.diffusion.latents import CLASS_MEANS_FILE
from pipeline.diffusion.sampler import Sampler, label_matched
from pipeline.figures.grids import save_rows
from pipeline.formats.dicom import write_synthetic_dicom

SECTION = "ldm"  # the params.yaml section this stage reads: the sampling keys
app = typer.Typer(add_completion=False, help=__doc__)


def export_dicom(folder: Path, images: np.ndarray, labels: np.ndarray, seeds: list[int], per_class: int,
                 settings: str) -> None:
    """Write the first ``per_class`` images of each class as synthetic DICOM files."""
    idx = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(len(CLASSES))])
    if len(idx):
        write_synthetic_dicom(folder, images[idx], [CLASSES[labels[i]] for i in idx],
                              [f"label={CLASSES[labels[i]]} seed={seeds[i]} {settings}" for i in idx])


@app.command()
def main(
    ldm: Path = typer.Option(..., help="Diffusion model folder (output of train_ldm)."),
    autoencoder: Path = typer.Option(..., help="Autoencoder model folder."),
    latents: Path = typer.Option(..., help="Latents folder (for the training-set class counts)."),
    out: Path = typer.Option(..., help="Output folder: cohort_matched.npz, cohort_balanced.npz, settings.json, "
                             "dicom/."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (counts, images/s)."),
    grid: Path = typer.Option(..., help="Output PNG grid of samples per class."),
    params: Path = params_option(),
    guidance_scale: float = typer.Option(..., min=0.0, help="Classifier-free guidance scale w (1 = no guidance)."),
    guidance_max_t: list[int] = typer.Option(..., help="Per class (normal, then pneumonia; repeat the "
                                             "option): guide only at timesteps t <= this, above it use the plain "
                                             "conditional prediction (guidance interval; 1000 = every step)."),
    num_inference_steps: int = typer.Option(..., min=1, help="DDIM steps."),
    clip_denoised: float = typer.Option(..., min=0.0, help="Clamp DDIM's predicted clean latent to ±this at every "
                                        "step (normalised latent units; 0 = off)."),
    eta: float = typer.Option(..., min=0.0, help="DDIM stochasticity: 0 deterministic DDIM, 1 ancestral sampling on "
                              "the DDIM grid (fresh noise at each step, from each image's own seed)."),
    x0_spread: float = typer.Option(..., min=0.0, help="x0 spread factor s (1 = off): at t >= x0_spread_min_t each "
                                    "step goes from m + s (x0-hat - m), m the class's mean training latent (README, "
                                    "\"The x0 spread\")."),
    x0_spread_min_t: int = typer.Option(..., min=0, help="The smallest timestep the x0 spread acts at (the high-noise "
                                        "steps, where the sampler loses variance)."),
    balanced_per_class: int = typer.Option(..., min=0, help="Images per class in the balanced cohort."),
    sample_seed: int = typer.Option(..., help="Image i of a cohort uses seed sample_seed + i."),
    sample_batch_size: int = typer.Option(..., min=1, help="Images per batch (no effect on the images)."),
    dicom_per_class: int = typer.Option(..., min=0, help="Balanced-cohort images per class also written as "
                                        "synthetic DICOM (out/dicom/); 0 = none."),
) -> None:
    """Sample the label-matched and balanced cohorts; write arrays, a grid and sampling speed."""
    t0 = time.time()
    sampler = Sampler.with_spread(ldm, autoencoder, num_inference_steps, pick_device(), clip_denoised, eta,
                                  guidance_max_t, x0_spread, x0_spread_min_t, latents)
    with np.load(latents / "train.npz") as z:
        matched = label_matched(z["labels"])
    balanced = np.repeat(np.arange(len(CLASSES)), balanced_per_class)
    cohorts = {"matched": matched, "balanced": balanced}
    result: dict[str, float | int] = {}
    with atomic_outputs(out, metrics, grid) as (tmp_out, tmp_metrics, tmp_grid):
        tmp_out.mkdir()
        for name, labels in cohorts.items():
            seeds = [sample_seed + i for i in range(len(labels))]
            t1 = time.time()
            images = sampler.generate(labels, seeds, guidance_scale, sample_batch_size, desc=f"cohort {name}")
            save_npz(tmp_out / f"cohort_{name}.npz", images=images, labels=labels, seeds=np.asarray(seeds))
            result[f"{name}_n"] = int(len(labels))
            result[f"{name}_images_per_s"] = round(len(labels) / max(time.time() - t1, 1e-9), 3)
            if name == "matched":
                save_rows(tmp_grid, [(c, images[labels == k][:12]) for k, c in enumerate(CLASSES)],
                          f"samples, guidance {guidance_scale} (t <= {'/'.join(map(str, guidance_max_t))}), "
                          f"{num_inference_steps} DDIM steps, eta {eta:g}{sampler.spread_label()}")
            else:
                export_dicom(tmp_out / "dicom", images, labels, seeds, dicom_per_class,
                             f"guidance={guidance_scale} guidance_max_t={','.join(map(str, guidance_max_t))} "
                             f"ddim_steps={num_inference_steps} clip={clip_denoised} eta={eta:g}"
                             f"{sampler.spread_label(compact=True)}")
        write_json(tmp_out / "settings.json", {"guidance_scale": guidance_scale, "sample_seed": sample_seed,
                                                 "guidance_max_t": list(guidance_max_t),
                                                 "num_inference_steps": num_inference_steps,
                                                 "clip_denoised": clip_denoised, "eta": eta,
                                                 "x0_spread": x0_spread, "x0_spread_min_t": x0_spread_min_t})
        if sampler.class_means is not None:
            save_npz(tmp_out / CLASS_MEANS_FILE, class_means=sampler.class_means.cpu().numpy())
        result["wall_time_s"] = round(time.time() - t0, 1)
        write_json(tmp_metrics, result)


if __name__ == "__main__":
    run_stage(app, SECTION)
