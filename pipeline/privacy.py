"""Stage ``privacy``: does the synthetic cohort copy training images, and is it as diverse as real images?

Memorisation. For every image of the label-matched cohort, its nearest and second-nearest real training image, in
pixel space (L2 on images in [0, 1], 784-d) and in FID Inception space (L2 on the 2048-d features of
:mod:`pipeline.evaluation.fid`), by exact distances (:mod:`pipeline.evaluation.privacy`). The same for real test images (never trained
on: the reference distribution of "close but not copied") and real val images. Near-copy rule, in each space: the
nearest training image is closer than ``near_copy_ratio`` (1/3) times the second nearest (Yoon et al. 2023; Gu et
al., TMLR 2025; after Carlini et al. 2023). PneumoniaMNIST's train split holds duplicates (18 pairs at L2 <= 0.02, the
next pair 0.91 apart), which would hide a copy of them (d1 ≈ d2): train images closer than ``duplicate_distance``
count as one.

The gate: ``near_copies`` counts the synthetic images flagged in pixel space or in Inception space (either one). When
it exceeds ``max_near_copies``, the stage still writes its metrics and figures, so that a person can look at the
flagged pairs, then exits with status 1 and an ``error:`` line naming the count, the rule and the params key: DVC
records no successful run, so a cohort that copies training images cannot pass ``dvc repro`` silently.

Also reported: d1 quantiles (p01, p05, p50) of synthetic->train and test->train, the fraction of synthetic images closer
to train than the 1st and 5th percentile of test->train (about 0.01 and 0.05 for a model that generalises), and the
real val images flagged by the same rule (MedMNIST's val split holds 8 exact copies of train images: the rule's check).

Diversity: mean MS-SSIM over ``n_pairs`` random pairs of distinct images of one class, synthetic and real train, at the
native 28 px: ``ssim_scales`` scales (28, 14, 7 px) weighted by Wang et al.'s first weights renormalised, a
``ssim_kernel_size`` Gaussian window of std ``ssim_sigma`` (the standard 5 scales and 11-px window need >= 161 px).
Higher than real: less diverse (collapse); lower: noisier than real. Reads the ``privacy`` section.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from pipeline.core.artifacts import atomic_outputs, load_npz, write_json
from pipeline.core.cli import PipelineError, params_option, run_stage
from pipeline.core.data import real_images
from pipeline.evaluation.privacy import (REFERENCES, SPACES, ImageSet, Neighbours, check_gate, diversity_metrics,
                                         near_copy_mask, neighbours, quantiles, space_metrics, unique_indices,
                                         unit_pixels)
from pipeline.figures.charts import save_histograms
from pipeline.figures.grids import PairBlock, save_pairs

SECTION = "privacy"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


def load_cohort(samples: Path, features: Path) -> ImageSet:
    """The label-matched cohort with its Inception features; they must come from the same run."""
    cohort = load_npz(samples / "cohort_matched.npz", ("images", "labels"), "sample")
    images, labels = cohort["images"], cohort["labels"]
    z = load_npz(features, ("features", "labels"), "fid")
    feats, feat_labels = z["features"], z["labels"]
    if len(feats) != len(images) or not np.array_equal(feat_labels, labels):
        raise PipelineError(f"{features} does not belong to {samples / 'cohort_matched.npz'} ({len(feats)} vs "
                            f"{len(images)} images, or other labels): rerun the fid stage on these samples")
    return ImageSet(images, labels, feats)


def load_real(data: Path, fid_ref: Path, split: str) -> ImageSet:
    """A real split's unpadded uint8 images, labels and cached Inception features."""
    images, labels = real_images(data, split)
    feats = load_npz(fid_ref / f"{split}.npz", ("features",), "fid_ref")["features"]
    if len(feats) != len(images):
        raise PipelineError(f"{fid_ref / f'{split}.npz'} has {len(feats)} feature vectors for {len(images)} "
                            f"{split} images: rerun fid_ref on this prepared data")
    return ImageSet(images, labels, feats)


def closest_block(query: ImageSet, train: ImageSet, train_ids: np.ndarray, nb: Neighbours, flagged: np.ndarray,
                  n: int, labels: tuple[str, str], prefix: str) -> PairBlock:
    """The ``n`` closest pairs, flagged near-copies first; captions give both indices, d1 and d1/d2."""
    order = np.lexsort((nb.d1, ~flagged))[:n]
    captions = [f"{prefix}{i}>tr{train_ids[nb.index[i]]}\nd={nb.d1[i]:.2f} r={nb.ratio[i]:.2f}"
                + (" COPY" if flagged[i] else "") for i in order]
    return PairBlock(labels[0], labels[1], query.images[order], train.images[nb.index[order]], captions)


def distance_panels(nb: dict[str, dict[str, Neighbours]],
                    ratio: float) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, float]]]:
    """Histogram panels (d1 and d1/d2, per space, synthetic vs real test) and their reference lines."""
    panels, marks = {}, {}
    for space in SPACES:
        syn, test = nb[space]["synthetic"], nb[space]["test"]
        d1_name, ratio_name = f"{space} L2 to nearest train image", f"{space} d1 / d2"
        panels[d1_name] = {"synthetic": syn.d1, "real test": test.d1}
        q = quantiles(test.d1)
        marks[d1_name] = {"test p01": q["p01"], "test p05": q["p05"]}
        panels[ratio_name] = {"synthetic": syn.ratio, "real test": test.ratio}
        marks[ratio_name] = {f"near-copy ratio {ratio:g}": ratio}
    return panels, marks


@app.command()
def main(
    samples: Path = typer.Option(..., help="Samples folder (output of sample): cohort_matched.npz."),
    features: Path = typer.Option(..., help="Inception features of the cohort (output of fid)."),
    data: Path = typer.Option(..., help="Prepared real data (output of prepare)."),
    fid_ref: Path = typer.Option(..., help="Real-image Inception features (output of fid_ref)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    pairs_figure: Path = typer.Option(..., help="Output PNG: the closest synthetic/train pairs."),
    distances_figure: Path = typer.Option(..., help="Output PNG: nearest-train-image distance histograms."),
    params: Path = params_option(),
    near_copy_ratio: float = typer.Option(..., min=0.0, max=1.0,
                                          help="Near-copy: nearest train image closer than this times the second."),
    max_near_copies: int = typer.Option(..., min=0, help="Gate: fail when more synthetic images are near-copies."),
    duplicate_distance: float = typer.Option(..., min=0.0,
                                             help="Train images closer than this (pixel L2, [0, 1]) count as one."),
    n_show: int = typer.Option(..., min=1, help="Closest pairs shown per block of the pairs figure."),
    n_pairs: int = typer.Option(..., min=1, help="Random same-class pairs per class and set for MS-SSIM."),
    ssim_scales: int = typer.Option(..., min=1, max=5, help="MS-SSIM scales (28 px: 3 -> 28, 14, 7 px)."),
    ssim_kernel_size: int = typer.Option(..., min=3, help="MS-SSIM Gaussian window size (odd)."),
    ssim_sigma: float = typer.Option(..., min=0.01, help="MS-SSIM Gaussian window std (pixels)."),
    seed: int = typer.Option(..., help="Seed of the MS-SSIM pair draws."),
) -> None:
    """Nearest-training-image distances and the near-copy gate, plus MS-SSIM diversity vs real images."""
    t0 = time.time()
    synthetic = load_cohort(samples, features)
    full_train = load_real(data, fid_ref, "train")
    real = {ref: load_real(data, fid_ref, ref) for ref in REFERENCES}
    train_ids = unique_indices(unit_pixels(full_train.images), duplicate_distance)
    if len(train_ids) < 2:
        raise PipelineError(f"the train split has {len(train_ids)} distinct image(s); nearest neighbours need 2")
    train = full_train.subset(train_ids)
    queries = {"synthetic": synthetic, **real}
    nb = {space: {name: neighbours(q, train, space, f"{space} {name}->train") for name, q in queries.items()}
          for space in SPACES}
    flagged = {space: near_copy_mask(nb[space]["synthetic"].d1, nb[space]["synthetic"].d2, near_copy_ratio)
               for space in SPACES}
    copies = flagged["pixel"] | flagged["inception"]
    out: dict[str, float] = {"near_copies": int(copies.sum()), "near_copy_fraction": float(copies.mean()),
                             "n_synthetic": len(synthetic.images), "n_train": len(full_train.images),
                             "n_train_distinct": len(train_ids), "n_test": len(real["test"].images),
                             "n_val": len(real["val"].images)}
    for space in SPACES:
        out.update(space_metrics(space, nb[space], near_copy_ratio))
    out.update(diversity_metrics(synthetic, full_train, n_pairs, seed, ssim_kernel_size, ssim_sigma, ssim_scales))
    out = {k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}
    out["wall_time_s"] = round(time.time() - t0, 1)
    no_flags = np.zeros(len(real["test"].images), bool)
    blocks = [closest_block(synthetic, train, train_ids, nb["pixel"]["synthetic"], flagged["pixel"], n_show,
                            ("synthetic", "nearest train\n(pixel L2)"), "s"),
              closest_block(synthetic, train, train_ids, nb["inception"]["synthetic"], flagged["inception"], n_show,
                            ("synthetic", "nearest train\n(Inception)"), "s"),
              closest_block(real["test"], train, train_ids, nb["pixel"]["test"], no_flags, n_show,
                            ("real test\n(reference)", "nearest train\n(pixel L2)"), "t")]
    with atomic_outputs(metrics, pairs_figure, distances_figure) as (tmp_metrics, tmp_pairs, tmp_distances):
        write_json(tmp_metrics, out)
        save_pairs(tmp_pairs, blocks, "closest synthetic/train pairs, flagged near-copies (COPY) first\n"
                                      f"d: L2 distance, r: d1 / d2; near-copy when r < {near_copy_ratio:g}")
        save_histograms(tmp_distances, *distance_panels(nb, near_copy_ratio),
                        "distance to the nearest real train image: synthetic vs real test")
    typer.echo(" ".join(f"{k}={v}" for k, v in out.items()), err=True)
    check_gate(out, near_copy_ratio, max_near_copies, pairs_figure)


if __name__ == "__main__":
    run_stage(app, SECTION)
