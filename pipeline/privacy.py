"""Stage ``privacy``: does the synthetic cohort copy training images, and is it as diverse as real images?

Memorisation. For every image of the label-matched cohort, its nearest and second-nearest real training image, in
pixel space (L2 on images in [0, 1], 784-d) and in FID Inception space (L2 on the 2048-d features of
:mod:`pipeline.fid`), by exact distances (:mod:`pipeline.memorization`). The same for real test images (never trained
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from pipeline.artifacts import atomic_outputs, write_json
from pipeline.cli import PipelineError, params_option, run_stage
from pipeline.data import CLASSES
from pipeline.fid_ref import real_uint8
from pipeline.memorization import (distance_ratio, msssim_of_pairs, near_copy_mask, nearest_two, quantiles,
                                   unique_indices, unit_pixels)
from pipeline.pair_plots import PairBlock, save_histograms, save_pairs

SECTION = "privacy"  # the params.yaml section this stage reads
SPACES = ("pixel", "inception")
REFERENCES = ("test", "val")  # real splits never trained on
app = typer.Typer(add_completion=False, help=__doc__)


@dataclass
class ImageSet:
    """uint8 images N×H×W, their labels and their Inception features (N×2048)."""

    images: np.ndarray
    labels: np.ndarray
    features: np.ndarray

    def vectors(self, space: str) -> np.ndarray:
        """The vectors whose L2 distances define ``space``."""
        return unit_pixels(self.images).numpy() if space == "pixel" else self.features

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The images at ``idx``."""
        return ImageSet(self.images[idx], self.labels[idx], self.features[idx])


@dataclass
class Neighbours:
    """Distances of queries to their nearest (d1) and second-nearest (d2) train image, and the nearest's index."""

    d1: np.ndarray
    d2: np.ndarray
    index: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        """d1 / d2 (0 where both are 0)."""
        return distance_ratio(self.d1, self.d2)


def load_cohort(samples: Path, features: Path) -> ImageSet:
    """The label-matched cohort with its Inception features; they must come from the same run."""
    with np.load(samples / "cohort_matched.npz") as z:
        images, labels = z["images"], z["labels"]
    if not features.is_file():
        raise PipelineError(f"{features} not found: run the fid stage first (dvc repro fid)")
    with np.load(features) as z:
        feats, feat_labels = z["features"], z["labels"]
    if len(feats) != len(images) or not np.array_equal(feat_labels, labels):
        raise PipelineError(f"{features} does not belong to {samples / 'cohort_matched.npz'} ({len(feats)} vs "
                            f"{len(images)} images, or other labels): rerun the fid stage on these samples")
    return ImageSet(images, labels, feats)


def load_real(data: Path, fid_ref: Path, split: str) -> ImageSet:
    """A real split's unpadded uint8 images, labels and cached Inception features."""
    images, labels = real_uint8(data, split)
    with np.load(fid_ref / f"{split}.npz") as z:
        feats = z["features"]
    if len(feats) != len(images):
        raise PipelineError(f"{fid_ref / f'{split}.npz'} has {len(feats)} feature vectors for {len(images)} "
                            f"{split} images: rerun fid_ref on this prepared data")
    return ImageSet(images, labels, feats)


def neighbours(query: ImageSet, train: ImageSet, space: str, desc: str) -> Neighbours:
    """Nearest and second-nearest train image of every query image in ``space``."""
    return Neighbours(*nearest_two(query.vectors(space), train.vectors(space), desc=desc))


def space_metrics(space: str, nb: dict[str, Neighbours], ratio: float) -> dict[str, float]:
    """Near-copy counts, d1 quantiles and the calibrated fractions of one space (keys start with ``space``)."""
    syn, test = nb["synthetic"], nb["test"]
    flagged = near_copy_mask(syn.d1, syn.d2, ratio)
    out: dict[str, float] = {f"{space}_near_copies": int(flagged.sum()),
                             f"{space}_near_copy_fraction": float(flagged.mean())}
    for ref in REFERENCES:
        out[f"{space}_{ref}_near_copies"] = int(near_copy_mask(nb[ref].d1, nb[ref].d2, ratio).sum())
    q_syn, q_test = quantiles(syn.d1), quantiles(test.d1)
    out.update({f"{space}_d1_synthetic_{k}": v for k, v in q_syn.items()})
    out.update({f"{space}_d1_test_{k}": v for k, v in q_test.items()})
    for k in ("p01", "p05"):
        out[f"{space}_synthetic_below_test_{k}"] = float((syn.d1 < q_test[k]).mean())
    out[f"{space}_ratio_synthetic_min"] = float(syn.ratio.min())
    out[f"{space}_ratio_test_min"] = float(test.ratio.min())
    return out


def diversity_metrics(synthetic: ImageSet, real: ImageSet, n_pairs: int, seed: int, kernel_size: int, sigma: float,
                      scales: int) -> dict[str, float]:
    """Mean MS-SSIM of random same-class pairs, synthetic and real train, per class, and their difference."""
    out: dict[str, float] = {}
    for k, cls in enumerate(CLASSES):
        means = {}
        for s, (name, images) in enumerate((("synthetic", synthetic), ("real_train", real))):
            pool = images.images[images.labels == k]
            if len(pool) < 2:
                raise PipelineError(f"MS-SSIM needs at least 2 {name} images of class {cls}, got {len(pool)}")
            rng = np.random.default_rng([seed, k, s])  # one stream per class and set: each mean stands alone
            try:
                scores = msssim_of_pairs(pool, n_pairs, rng, kernel_size, sigma, scales, desc=f"ms-ssim {name} {cls}")
            except ValueError as exc:  # torchmetrics: window or number of scales too large for the image size
                raise PipelineError(f"privacy.ssim_kernel_size={kernel_size} / privacy.ssim_scales={scales} do not "
                                    f"fit {pool.shape[-1]}-px images: {exc}") from exc
            means[name] = float(scores.mean())
            out[f"msssim_{cls}_{name}"] = means[name]
        out[f"msssim_{cls}_diff"] = means["synthetic"] - means["real_train"]
    out["msssim_max_abs_diff"] = max(abs(out[f"msssim_{cls}_diff"]) for cls in CLASSES)
    return out


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
    near_copy_ratio: float = typer.Option(0.333, min=0.0, max=1.0,
                                          help="Near-copy: nearest train image closer than this times the second."),
    max_near_copies: int = typer.Option(0, min=0, help="Gate: fail when more synthetic images are near-copies."),
    duplicate_distance: float = typer.Option(0.1, min=0.0,
                                             help="Train images closer than this (pixel L2, [0, 1]) count as one."),
    n_show: int = typer.Option(16, min=1, help="Closest pairs shown per block of the pairs figure."),
    n_pairs: int = typer.Option(1000, min=1, help="Random same-class pairs per class and set for MS-SSIM."),
    ssim_scales: int = typer.Option(3, min=1, max=5, help="MS-SSIM scales (28 px: 3 -> 28, 14, 7 px)."),
    ssim_kernel_size: int = typer.Option(5, min=3, help="MS-SSIM Gaussian window size (odd)."),
    ssim_sigma: float = typer.Option(1.0, min=0.01, help="MS-SSIM Gaussian window std (pixels)."),
    seed: int = typer.Option(0, help="Seed of the MS-SSIM pair draws."),
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


def check_gate(out: dict[str, float], ratio: float, max_near_copies: int, figure: Path) -> None:
    """Fail (after the outputs are written) when more synthetic images are near-copies than allowed.

    Raises:
        PipelineError: ``near_copies`` > ``max_near_copies``.
    """
    if out["near_copies"] > max_near_copies:
        raise PipelineError(
            f"{out['near_copies']} of {out['n_synthetic']} synthetic images are near-copies of training images "
            f"(pixel {out['pixel_near_copies']}, Inception {out['inception_near_copies']}; rule: nearest train image "
            f"closer than privacy.near_copy_ratio={ratio:g} x the second nearest), more than "
            f"privacy.max_near_copies={max_near_copies}; look at {figure} (flagged pairs first)")


if __name__ == "__main__":
    run_stage(app, SECTION)
