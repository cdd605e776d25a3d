"""Stage ``external_eval``: how the models fare on external pediatric chest X-rays (VinDr-PCXR, or any DICOM folder
laid out the same way; see :mod:`pipeline.external` for the layout, the DICOM reading and the preprocessing).

- Evaluator AUC / accuracy / sensitivity / specificity on the external images, beside the same on the in-domain test
  split (the domain-shift drop).
- Inception FID and KID of the synthetic label-matched cohort vs the external images, per class, at equal N (N in the
  key); the same for the real in-domain test split vs the external images, the real-data baseline.
- Autoencoder reconstruction PSNR / SSIM / MAE on the external images beside the in-domain test split: does the latent
  space generalise?
- Counts of files read and skipped, by reason.

An absent folder (``root`` empty or missing) is normal: the stage succeeds with ``n_images: 0`` and says how to get
the data. Only derived numbers are written, never pixels or header values. Reads the ``external`` section.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from pipeline.artifacts import atomic_outputs, load_model, load_model_config, write_json
from pipeline.classifier import Evaluator, binary_metrics, load_classifier
from pipeline.cli import PipelineError, params_option, run_stage
from pipeline.data import CLASSES, pad_images
from pipeline.evaluate_autoencoder import fidelity, reconstruct_unpadded
from pipeline.external import COUNT_KEYS, ExternalSet, how_to_get_vindr, load_external
from pipeline.fid import fid_from_features, inception_features
from pipeline.fid_ref import real_uint8
from pipeline.models import REGISTRY, pick_device
from pipeline.quality import kid

SECTION = "external"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


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
    test, test_labels = real_uint8(data, "test")
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


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (the in-domain test split, for comparison)."),
    autoencoder: Path = typer.Option(..., help="Autoencoder model folder."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    samples: Path = typer.Option(..., help="Samples folder (output of sample): cohort_matched.npz."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    params: Path = params_option(),
    root: str = typer.Option("", help="Folder in the VinDr-PCXR layout (<split>/<image_id>.dicom, "
                             "image_labels_<split>.csv); empty or missing: no external data, nothing evaluated."),
    splits: list[str] = typer.Option(["test"], help="Splits of the external folder to read."),
    normal_label: str = typer.Option("No finding", help="Labels-CSV column meaning normal."),
    pneumonia_labels: list[str] = typer.Option(["Pneumonia"], help="Labels-CSV columns meaning pneumonia."),
    max_images: Optional[int] = typer.Option(None, min=1, help="Read at most this many labelled images (the first "
                                             "in split, then image_id, order); null reads all."),
    kid_subset_size: int = typer.Option(1000, min=2, help="Images per KID subset (capped at N)."),
    kid_subsets: int = typer.Option(100, min=1, help="Number of KID subsets."),
    seed: int = typer.Option(0, help="Seed of the KID subset draws."),
) -> None:
    """Evaluate the evaluator, the autoencoder and the synthetic cohort on external DICOMs; count what was skipped."""
    t0 = time.time()
    folder = Path(root).expanduser()
    found = bool(root) and folder.is_dir()
    out: dict[str, float | int] = {"root_found": int(found), **{k: 0 for k in COUNT_KEYS}}
    if found:
        log: list[str] = []
        size = int(load_model_config(autoencoder)["data"]["size"])
        ext = load_external(folder, splits, size, normal_label, pneumonia_labels, max_images, log)
        for line in log:
            typer.echo(line, err=True)
        out.update(ext.counts)
        if len(ext.labels):
            values = evaluate(ext, data, autoencoder, classifier, samples, kid_subset_size, kid_subsets, seed)
            out.update(finite(values))
    else:
        typer.echo(how_to_get_vindr(root), err=True)
    out["wall_time_s"] = round(time.time() - t0, 1)
    with atomic_outputs(metrics) as (tmp,):
        write_json(tmp, out)
    typer.echo(" ".join(f"{k}={v}" for k, v in out.items()), err=True)


def finite(values: dict[str, float]) -> dict[str, float]:
    """Values rounded for the metrics file, without NaN or infinity (JSON and DVC cannot hold them); a dropped key is
    reported on stderr."""
    dropped = [k for k, v in values.items() if not np.isfinite(v)]
    if dropped:
        typer.echo(f"not written (not a finite number): {', '.join(dropped)}", err=True)
    return {k: round(float(v), 5) for k, v in values.items() if k not in dropped}


if __name__ == "__main__":
    run_stage(app, SECTION)
