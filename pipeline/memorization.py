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

import numpy as np
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
from tqdm import tqdm

__all__ = ["MSSSIM_BETAS", "unit_pixels", "nearest_two", "distance_ratio", "near_copy_mask", "unique_indices",
           "quantiles", "random_pairs", "msssim", "msssim_of_pairs"]

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
