"""Scores of the models on external chest X-rays next to the in-domain test split: the evaluator's AUC and accuracy,
the autoencoder's reconstruction fidelity, and Inception FID / KID of synthetic and real test images against the
external images at equal N."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.core.artifacts import load_model
from pipeline.core.cli import PipelineError
from pipeline.core.data import CLASSES, pad_images, real_images
from pipeline.core.runtime import pick_device
from pipeline.diffusion.networks import REGISTRY
from pipeline.evaluation.classifier import Evaluator, binary_metrics, load_classifier
from pipeline.evaluation.fid import fid_from_features, inception_features
from pipeline.evaluation.quality import kid
from pipeline.evaluation.reconstruction import fidelity, reconstruct_unpadded
from pipeline.formats.external import ExternalSet

__all__ = ["classifier_table", "autoencoder_table", "distance_table", "equal_n_features", "check_size", "evaluate",
           "finite"]


def classifier_table(evaluator: Evaluator, images: np.ndarray, labels: np.ndarray, name: str) -> dict[str, float]:
    """``classifier_<name>_<metric>`` at the evaluator's threshold; with one class only, the metrics it allows."""
    prob = evaluator.predict_proba(images)
    if len(np.unique(labels)) == 2:
        metrics = binary_metrics(prob, labels, evaluator.threshold)
    else:  # AUC needs both classes; accuracy is then the recall of the class present
        pred = (prob >= evaluator.threshold).astype(np.int64)
        metrics = {"accuracy": float((pred == labels).mean())} if len(labels) else {}
        if len(labels):
            metrics["sensitivity" if labels[0] == 1 else "specificity"] = metrics["accuracy"]
    return {f"classifier_{name}_{k}": v for k, v in metrics.items()}


def autoencoder_table(ae: torch.nn.Module, config: dict, images: np.ndarray, name: str,
                      device: torch.device) -> dict[str, float]:
    """``autoencoder_<name>_{psnr_db,ssim,mae}`` of uint8 N×H×W images, padded and cropped as in training."""
    padded, pad = pad_images(images, config["data"]["padded_size"])
    if list(pad) != list(config["data"]["pad"]):
        raise PipelineError(f"images of size {images.shape[-1]} pad to {pad}, the autoencoder expects "
                            f"{config['data']['pad']}")
    real, recon = reconstruct_unpadded(ae, torch.from_numpy(padded).float() / 255.0, config["data"]["pad"], device)
    return {f"autoencoder_{name}_{k}": v for k, v in fidelity(recon, real).items()}


def distance_table(feats: np.ndarray, labels: np.ndarray, ext: np.ndarray, ext_labels: np.ndarray, name: str,
                   subset_size: int, n_subsets: int, seed: int) -> dict[str, float]:
    """Per class, Inception FID and KID of ``name`` images vs external images, both sides cut to the same N.

    N = min(#images of the class on each side) is in every key; a class with fewer than 2 images on either side has
    no key (the distances need 2).
    """
    out: dict[str, float] = {}
    for k, cls in enumerate(CLASSES):
        a, b = feats[labels == k], ext[ext_labels == k]
        n = min(len(a), len(b))
        if n < 2:
            continue
        key = f"inception_{name}_{cls}_vs_external_{cls}_n{n}"
        out[f"fid_{key}"] = fid_from_features(a[:n], b[:n])
        mean, std = kid(a[:n], b[:n], subset_size, n_subsets, seed)
        out[f"kid_{key}_mean"], out[f"kid_{key}_std"] = mean, std
    return out


def equal_n_features(images: np.ndarray, labels: np.ndarray, ext_labels: np.ndarray, desc: str) -> np.ndarray:
    """Inception features of only the images :func:`distance_table` will use (the first N of each class); the rest
    of the rows stay zero, so indices still match ``labels``."""
    feats = np.zeros((len(images), 2048), np.float32)
    keep = np.concatenate([np.flatnonzero(labels == k)[:(ext_labels == k).sum()] for k in range(len(CLASSES))])
    if len(keep):
        feats[keep] = inception_features(images[keep], desc=desc)
    return feats


def check_size(name: str, size: int, expected: int) -> None:
    """Every model and data set must work at the same image size."""
    if size != expected:
        raise PipelineError(f"{name} works at {size}×{size} but the autoencoder at {expected}×{expected}; "
                            "rerun the pipeline so that every stage uses the same data.size")


def evaluate(ext: ExternalSet, data: Path, autoencoder: Path, classifier: Path, samples: Path,
             kid_subset_size: int, kid_subsets: int, seed: int) -> dict[str, float]:
    """Every model metric of the external set (at least one image) next to the in-domain test split."""
    device = pick_device()
    ae, config = load_model(autoencoder, REGISTRY)
    ae.to(device)
    size = config["data"]["size"]
    evaluator = load_classifier(classifier)
    check_size(f"the classifier in {classifier}", evaluator.size, size)
    with np.load(samples / "cohort_matched.npz") as z:
        synth, synth_labels = z["images"], z["labels"]
    check_size(f"the synthetic cohort in {samples}", synth.shape[-1], size)
    test, test_labels = real_images(data, "test")
    check_size(f"the prepared data in {data}", test.shape[-1], size)
    out: dict[str, float] = {"external_pixel_mean": float(ext.images.mean() / 255.0),
                             "external_pixel_std": float(ext.images.std() / 255.0)}
    for name, images, labels in (("external", ext.images, ext.labels), ("test", test, test_labels)):
        out.update(classifier_table(evaluator, images, labels, name))
        out.update(autoencoder_table(ae, config, images, name, device))
    if "classifier_external_auc" in out:
        out["classifier_auc_drop"] = out["classifier_test_auc"] - out["classifier_external_auc"]
    out["autoencoder_psnr_drop_db"] = out["autoencoder_test_psnr_db"] - out["autoencoder_external_psnr_db"]
    ext_feats = inception_features(ext.images, desc="inception external")
    for name, images, labels in (("synthetic", synth, synth_labels), ("test", test, test_labels)):
        feats = equal_n_features(images, labels, ext.labels, f"inception {name}")
        out.update(distance_table(feats, labels, ext_feats, ext.labels, name, kid_subset_size, kid_subsets, seed))
    return out


def finite(values: dict[str, float]) -> dict[str, float]:
    """Values rounded for the metrics file, without NaN or infinity (JSON and DVC cannot hold them); a dropped key is
    reported on stderr."""
    dropped = [k for k, v in values.items() if not np.isfinite(v)]
    if dropped:
        print(f"not written (not a finite number): {', '.join(dropped)}", file=sys.stderr)
    return {k: round(float(v), 5) for k, v in values.items() if k not in dropped}
