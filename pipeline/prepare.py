"""Stage ``prepare``: fetch PneumoniaMNIST through medmnist, pad it for the U-Net, write array shards and a summary.

Reads the ``data`` section of params.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from pipeline.core.artifacts import atomic_outputs, save_npz, write_json
from pipeline.core.cli import PipelineError, params_option, run_stage
from pipeline.core.data import CLASSES, SIZES, SPLITS, data_root, ensure_npz, load_medmnist, pad_images
from pipeline.figures.grids import save_rows

SECTION = "data"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


def subsample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of at most ``per_class`` images of each class, chosen at random with ``seed``, in ascending order."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def summarise(split: str, images: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """Counts per class and pixel mean/std (in [0, 1]) of one unpadded split."""
    out: dict[str, float | int] = {f"{split}_n": int(len(labels))}
    for c, name in enumerate(CLASSES):
        out[f"{split}_{name}"] = int((labels == c).sum())
    out[f"{split}_pixel_mean"] = round(float(images.mean() / 255.0), 6)
    out[f"{split}_pixel_std"] = round(float(images.std() / 255.0), 6)
    return out


def example_rows(images: np.ndarray, labels: np.ndarray, n: int) -> list[tuple[str, np.ndarray]]:
    """The first ``n`` images of each class, one row per class."""
    return [(name, images[labels == c][:n]) for c, name in enumerate(CLASSES)]


@app.command()
def main(
    out: Path = typer.Option(..., help="Output folder of prepared shards (<split>.npz + meta.json)."),
    metrics: Path = typer.Option(..., help="Output JSON of counts and pixel statistics."),
    grid: Path = typer.Option(..., help="Output PNG with example images of each class."),
    params: Path = params_option(),
    size: int = typer.Option(..., help="Image size: one of 28, 64, 128, 224 (medmnist's sizes)."),
    root: str = typer.Option(..., help="medmnist data root; empty means $MEDMNIST_ROOT, else ~/.medmnist."),
    pad_multiple: int = typer.Option(..., min=1, help="Pad images (reflect) to a multiple of this (28 -> 32)."),
    max_per_class: Optional[int] = typer.Option(None, min=1, help="Keep at most this many images per class and "
                                                "split (a tiny profile for tests); null keeps all."),
    seed: int = typer.Option(..., help="Seed for the max_per_class subsample."),
) -> None:
    """Fetch PneumoniaMNIST (MD5-checked), pad it, and write <split>.npz shards, meta.json, metrics and a grid."""
    if size not in SIZES:
        raise PipelineError(f"params key 'data.size' must be one of {', '.join(map(str, SIZES))}, got {size}")
    folder = data_root(root)
    ensure_npz(folder, size)
    summary: dict[str, float | int] = {"size": size}
    with atomic_outputs(out, metrics, grid) as (tmp_out, tmp_metrics, tmp_grid):
        tmp_out.mkdir()
        for split in SPLITS:
            images, labels = load_medmnist(folder, size, split)
            if max_per_class is not None:
                idx = subsample(labels, max_per_class, seed)
                images, labels = images[idx], labels[idx]
            padded, pad = pad_images(images, pad_multiple)
            save_npz(tmp_out / f"{split}.npz", images=padded, labels=labels)
            summary.update(summarise(split, images, labels))
            if split == "train":
                save_rows(tmp_grid, example_rows(images, labels, 12), f"PneumoniaMNIST {size}x{size}, train examples")
        summary["padded_size"] = int(padded.shape[-1])
        write_json(tmp_out / "meta.json", {"size": size, "padded_size": int(padded.shape[-1]), "pad": list(pad),
                                           "classes": list(CLASSES), "normalisation": "x / 255 -> [0, 1]"})
        write_json(tmp_metrics, summary)
    typer.echo(f"prepared {summary['train_n']}/{summary['val_n']}/{summary['test_n']} images, "
               f"{size}px padded to {summary['padded_size']}px -> {out}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
