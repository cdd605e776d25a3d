"""Stage ``fid_ref``: standard FID Inception features of the real splits, computed once and cached.

Writes ``<split>.npz`` (``features``: float32 N×2048, ``labels``: int64 N) per split, from the unpadded real images;
later stages take overall or per-class statistics from them. Protocol: see :mod:`pipeline.evaluation.fid`.
Reads the ``fid_ref`` section of params.yaml.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, save_npz, write_json
from pipeline.core.cli import params_option, run_stage
from pipeline.core.data import SPLITS, real_images
from pipeline.evaluation.fid import inception_features

SECTION = "fid_ref"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (output of prepare)."),
    out: Path = typer.Option(..., help="Output folder of <split>.npz Inception features."),
    metrics: Path = typer.Option(..., help="Output metrics JSON: images and images/s per split, wall time."),
    params: Path = params_option(),
    batch_size: int = typer.Option(..., min=1, help="Images per Inception forward pass (no effect on results)."),
) -> None:
    """Compute and cache FID Inception features of the real train, val and test splits."""
    start, result = time.time(), {}
    with atomic_outputs(out, metrics) as (tmp, tmp_metrics):
        tmp.mkdir()
        for split in SPLITS:
            t0 = time.time()
            images, labels = real_images(data, split)
            feats = inception_features(images, batch_size, desc=f"inception {split}")
            save_npz(tmp / f"{split}.npz", features=feats, labels=labels)
            rate = len(images) / max(time.time() - t0, 1e-9)
            result |= {f"{split}_n": len(images), f"{split}_images_per_s": round(rate, 2)}
            typer.echo(f"{split}: {len(images)} images, {rate:.1f} images/s", err=True)
        result["wall_time_s"] = round(time.time() - start, 1)
        write_json(tmp_metrics, result)


if __name__ == "__main__":
    run_stage(app, SECTION)
