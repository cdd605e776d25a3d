"""Stage ``encode_latents``: encode every split to autoencoder latents (posterior means) and compute the scale factor.

The latent scale factor is 1 / std of the train latents (Rombach et al., CVPR 2022, sec. 4.3.2), so the diffusion
model sees unit-variance inputs; the per-channel means and stds are stored too, because the channels of a lightly
KL-regularised autoencoder differ in scale by more than 10× (``ldm.latent_norm`` picks which one the diffusion model
uses). They are computed here and stored in ``scale.json`` beside the latents, never copied by hand. This stage has no
hyperparameters.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, load_model, save_npz, write_json
from pipeline.core.cli import run_stage
from pipeline.core.data import SPLITS, load_prepared
from pipeline.core.runtime import pick_device
from pipeline.diffusion.latents import scale_stats
from pipeline.diffusion.networks import REGISTRY, encode_mean

SECTION = None  # no hyperparameters
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder."),
    model: Path = typer.Option(..., help="Autoencoder model folder."),
    out: Path = typer.Option(..., help="Output folder: <split>.npz latents + scale.json."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (scale factor and latent statistics)."),
) -> None:
    """Encode train/val/test to latents and write the latent scale factor."""
    t0 = time.time()
    device = pick_device()
    ae, _ = load_model(model, REGISTRY)
    ae.to(device)
    with atomic_outputs(out, metrics) as (tmp_out, tmp_metrics):
        tmp_out.mkdir()
        for split in SPLITS:
            x, y = load_prepared(data, split)
            z = encode_mean(ae, x, 256, device)
            save_npz(tmp_out / f"{split}.npz", latents=z.numpy(), labels=y.numpy())
            if split == "train":
                stats = scale_stats(z)
        write_json(tmp_out / "scale.json", stats)
        summary = {k: round(v, 6) for k, v in stats.items() if isinstance(v, float)}
        summary["channel_std_min"] = round(min(stats["channel_std"]), 6)
        summary["channel_std_max"] = round(max(stats["channel_std"]), 6)
        summary["wall_time_s"] = round(time.time() - t0, 1)
        write_json(tmp_metrics, summary)
    typer.echo(f"latents {stats['latent_shape']}, scale factor {stats['scale_factor']:.4f} -> {out}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
