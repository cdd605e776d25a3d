"""Memorisation and diversity measures for synthetic images: nearest training neighbours, the near-copy rule, and
MS-SSIM among random same-class pairs.

- Nearest neighbours: exact Euclidean distances (float64) from every query to its nearest and second-nearest
  reference vector, in chunks; used in pixel space (uint8 images -> [0, 1], flattened) and in Inception space.
- Near-copy rule: a query is a near-copy of its nearest reference when d1 < ratio · d2, d1 and d2 the distances to
  the nearest and second-nearest reference (ratio 1/3 in Yoon et al., "Diffusion Probabilistic Models Generalize when
  They Fail to Memorize", 2023, and Gu et al., "On Memorization in Diffusion Models", TMLR 2025; a relative rule in
  the spirit of Carlini et al., "Extracting Training Data from Diffusion Models", USENIX Security 2023, whose
  distance is also relative to the query's neighbourhood). A relative rule adapts to how crowded the neighbourhood is:
  a smooth image close to many training images is not flagged, a copy of one image is. Exact duplicates inside the
  reference would hide a copy of them (d1 = d2 = 0), so :func:`unique_indices` collapses them first.
- Diversity: multi-scale SSIM (Wang et al., "Multi-scale structural similarity for image quality assessment", 2003)
  averaged over random pairs of one class, as in Odena et al., "Conditional Image Synthesis with Auxiliary Classifier
  GANs", ICML 2017: near 1 means collapsed (all alike), near 0 means unrelated noise; compare with real pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
from tqdm import tqdm

from pipeline.core.cli import PipelineError
from pipeline.core.data import CLASSES

__all__ = ["MSSSIM_BETAS", "SPACES", "REFERENCES", "ImageSet", "Neighbours", "unit_pixels", "nearest_two",
           "distance_ratio", "near_copy_mask", "unique_indices", "quantiles", "random_pairs", "msssim",
           "msssim_of_pairs", "neighbours", "space_metrics", "diversity_metrics", "check_gate"]

MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Wang et al.'s weights of scales 1 (finest) to 5; fewer scales take the first ones, renormalised to sum 1."""


def unit_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images N×H×W -> float64 N×(H·W) in [0, 1]: the vectors of pixel-space distances."""
    return torch.from_numpy(images.reshape(len(images), -1)).double().div_(255.0)


def nearest_two(query: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, chunk_size: int = 512,
                desc: str = "nearest neighbours") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance of every query vector to its nearest and second-nearest reference vector.

    Args:
        query: N×D vectors.
        ref: M×D vectors, M >= 2.
        chunk_size: query rows per distance block (memory only; no effect on results).
        desc: progress-bar label.

    Returns:
        d1 (N), d2 (N) as float64 Euclidean distances, and the index into ``ref`` of each nearest vector (N).
    """
    q, r = torch.as_tensor(query).double(), torch.as_tensor(ref).double()
    if len(r) < 2:
        raise ValueError(f"nearest_two needs at least 2 reference vectors, got {len(r)}")
    d1, d2, idx = [], [], []
    for start in tqdm(range(0, len(q), chunk_size), desc=desc, unit="chunk", leave=False):
        dist = torch.cdist(q[start:start + chunk_size], r)  # float64: duplicates come out at ~1e-7, not ~1e-2
        values, indices = dist.topk(2, dim=1, largest=False)
        d1.append(values[:, 0])
        d2.append(values[:, 1])
        idx.append(indices[:, 0])
    return torch.cat(d1).numpy(), torch.cat(d2).numpy(), torch.cat(idx).numpy()


def distance_ratio(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """d1 / d2, with 0 where d2 = 0 (then d1 = 0 too: the query equals two reference vectors)."""
    return np.divide(d1, d2, out=np.zeros_like(d1, dtype=np.float64), where=d2 > 0)


def near_copy_mask(d1: np.ndarray, d2: np.ndarray, ratio: float) -> np.ndarray:
    """True where a query is a near-copy of its nearest reference: d1 < ratio · d2 (or d1 = d2 = 0)."""
    return distance_ratio(d1, d2) < ratio


def unique_indices(vectors: torch.Tensor | np.ndarray, tol: float, chunk_size: int = 512) -> np.ndarray:
    """Indices of one representative (the lowest index) of every group of near-identical vectors.

    Two vectors closer than ``tol`` are the same image; groups are the connected components of that relation.

    Args:
        vectors: N×D vectors.
        tol: distance below which two vectors count as duplicates.
        chunk_size: rows per distance block (memory only).

    Returns:
        Sorted int64 indices of the representatives.
    """
    v = torch.as_tensor(vectors).double()
    parent = np.arange(len(v))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(v), chunk_size):
        close = (torch.cdist(v[start:start + chunk_size], v) < tol).nonzero().numpy()
        for i, j in close:
            a, b = root(start + i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.flatnonzero([root(i) == i for i in range(len(v))]).astype(np.int64)


def quantiles(values: np.ndarray, qs: tuple[float, ...] = (0.01, 0.05, 0.5)) -> dict[str, float]:
    """Quantiles keyed ``p01``, ``p05``, ``p50``... (linear interpolation)."""
    return {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in qs}


def random_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` random index pairs (i, j) of ``n`` items with i != j, drawn with replacement."""
    if n < 2:
        raise ValueError(f"random pairs need at least 2 items, got {n}")
    i = rng.integers(0, n, n_pairs)
    return i, (i + rng.integers(1, n, n_pairs)) % n


def msssim(a: torch.Tensor, b: torch.Tensor, kernel_size: int, sigma: float, scales: int) -> torch.Tensor:
    """Per-pair MS-SSIM of images in [0, 1], N×1×H×W, with ``scales`` scales (Wang's first weights, renormalised).

    Negative contrast-structure terms are clipped at 0 (torchmetrics' ``normalize="relu"``), so the value is in [0, 1].

    Raises:
        ValueError: the images are too small for this kernel and number of scales (torchmetrics' message).
    """
    betas = np.asarray(MSSSIM_BETAS[:scales])
    return multiscale_structural_similarity_index_measure(
        a.float(), b.float(), kernel_size=kernel_size, sigma=sigma, betas=tuple((betas / betas.sum()).tolist()),
        data_range=1.0, reduction="none", normalize="relu")


def msssim_of_pairs(images: np.ndarray, n_pairs: int, rng: np.random.Generator, kernel_size: int, sigma: float,
                    scales: int, batch_size: int = 256, desc: str = "ms-ssim") -> np.ndarray:
    """MS-SSIM of ``n_pairs`` random pairs of distinct images drawn from uint8 images N×H×W.

    Returns:
        float64 scores, one per pair.
    """
    i, j = random_pairs(len(images), n_pairs, rng)
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    out = [msssim(x[i[s:s + batch_size]], x[j[s:s + batch_size]], kernel_size, sigma, scales)
           for s in tqdm(range(0, n_pairs, batch_size), desc=desc, unit="batch", leave=False)]
    return torch.cat(out).double().numpy()


SPACES = ("pixel", "inception")
REFERENCES = ("test", "val")  # real splits never trained on


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
