"""Stage ``evaluate_autoencoder``: how faithful are the autoencoder's reconstructions, and what FID do they cap?

Test-set PSNR / SSIM / MAE on the unpadded images in [0, 1], and the standard Inception FID of reconstructed vs real
images (train at N = train size, test at N = test size). An LDM cannot score a better FID than its autoencoder's own
reconstructions, so this FID is the ceiling of the whole model. Reads the ``evaluate_autoencoder`` section.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import typer

from pipeline.core.artifacts import atomic_outputs, load_model, write_json
from pipeline.core.cli import params_option, run_stage
from pipeline.core.data import load_prepared, to_uint8
from pipeline.core.runtime import pick_device
from pipeline.diffusion.networks import REGISTRY, encode_mean
from pipeline.evaluation.fid import fid_from_features, inception_features
from pipeline.evaluation.reconstruction import fidelity, reconstruct_unpadded
from pipeline.figures.grids import save_rows

SECTION = "evaluate_autoencoder"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder."),
    model: Path = typer.Option(..., help="Autoencoder model folder."),
    fid_ref: Path = typer.Option(..., help="Folder of real-image Inception features (output of fid_ref)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    figure: Path = typer.Option(..., help="Output PNG: test images above their reconstructions."),
    params: Path = params_option(),
    n_show: int = typer.Option(..., min=1, help="Test images per class shown in the figure."),
) -> None:
    """Measure reconstruction PSNR/SSIM/MAE on test and reconstruction FID on train and test."""
    t0 = time.time()
    device = pick_device()
    ae, config = load_model(model, REGISTRY)
    ae.to(device)
    pad = config["data"]["pad"]
    out: dict[str, float | int] = {}
    with atomic_outputs(metrics, figure) as (tmp_metrics, tmp_figure):
        for split in ("test", "train"):
            x, labels = load_prepared(data, split)
            real, recon = reconstruct_unpadded(ae, x, pad, device)
            if split == "test":
                out.update({f"test_{k}": round(v, 5) for k, v in fidelity(recon, real).items()})
                save_rows(tmp_figure, comparison_rows(real, recon, labels.numpy(), n_show),
                          "test images (real) above their reconstructions")
            feats = inception_features(to_uint8(recon[:, 0]), desc=f"inception recon {split}")
            with np.load(fid_ref / f"{split}.npz") as z:
                out[f"fid_recon_{split}_vs_{split}_n{len(feats)}"] = round(fid_from_features(feats, z["features"]), 3)
        z_shape = encode_mean(ae, x[:1], 1, device).shape[1:]
        out["latent_channels"], out["latent_size"] = int(z_shape[0]), int(z_shape[-1])
        out["wall_time_s"] = round(time.time() - t0, 1)
        write_json(tmp_metrics, out)
    typer.echo(" ".join(f"{k}={v}" for k, v in out.items()), err=True)


def comparison_rows(real: torch.Tensor, recon: torch.Tensor, labels: np.ndarray,
                    n: int) -> list[tuple[str, np.ndarray]]:
    """Rows real / reconstruction for the first ``n`` test images of each class."""
    rows = []
    for c, name in enumerate(("normal", "pneumonia")):
        idx = np.flatnonzero(labels == c)[:n]
        rows += [(f"{name}\nreal", real[idx, 0].numpy()), (f"{name}\nrecon", recon[idx, 0].numpy())]
    return rows


if __name__ == "__main__":
    run_stage(app, SECTION)
