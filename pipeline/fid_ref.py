"""Stage ``fid_ref``: standard FID Inception features of the real splits, computed once and cached.

Writes ``<split>.npz`` (``features``: float32 N×2048, ``labels``: int64 N) per split, from the unpadded real images;
later stages take overall or per-class statistics from them. Protocol: see :mod:`pipeline.fid`.
Reads the ``fid_ref`` section of params.yaml.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from pipeline.artifacts import atomic_outputs, save_npz
from pipeline.cli import params_option, run_stage
from pipeline.data import SPLITS, crop, load_prepared, read_meta, to_uint8
from pipeline.fid import inception_features

SECTION = "fid_ref"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


def real_uint8(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpadded real images of a prepared split as uint8 N×H×W, and their labels."""
    x, y = load_prepared(data, split)
    return to_uint8(crop(x[:, 0], read_meta(data)["pad"])), y.numpy()


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (output of prepare)."),
    out: Path = typer.Option(..., help="Output folder of <split>.npz Inception features."),
    params: Path = params_option(),
    batch_size: int = typer.Option(50, min=1, help="Images per Inception forward pass (no effect on results)."),
) -> None:
    """Compute and cache FID Inception features of the real train, val and test splits."""
    with atomic_outputs(out) as (tmp,):
        tmp.mkdir()
        for split in SPLITS:
            t0 = time.time()
            images, labels = real_uint8(data, split)
            feats = inception_features(images, batch_size, desc=f"inception {split}")
            save_npz(tmp / f"{split}.npz", features=feats, labels=labels)
            typer.echo(f"{split}: {len(images)} images, {len(images) / (time.time() - t0):.1f} images/s", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
