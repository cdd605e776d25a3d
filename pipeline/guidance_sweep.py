"""Stage ``guidance_sweep``: sample quality and label fidelity against the classifier-free guidance scale.

For each scale, the same label-matched subset of the cohort (image i from seed ``seed + i``, train class proportions)
is sampled with the trained model and scored by Inception FID against the real val split, the held-out reference
every sampler choice is made on (docs/evaluation.md, "Which data chooses what"), by FID and KID against the whole
train split (reported, never chosen on), and by the evaluator's label fidelity (accuracy at its val threshold, AUC)
against the requested labels. ``selected_guidance_scale`` is the scale of lowest FID vs val. Low guidance keeps
diversity but blurs the classes; high guidance sharpens the classes and loses diversity. The whole-cohort figure at
one scale is what ``dvc exp run -S ldm.guidance_scale=W`` and the ``fid`` stage give; this stage trades N for a view
of the whole curve in one run. Reads the ``guidance_sweep`` section of params.yaml, and the sampler settings
(``num_inference_steps``, ``clip_denoised``, ``eta``, ``guidance_max_t``, ``x0_spread``, ``x0_spread_min_t``) from
the ``ldm`` section, so the sweep always samples as the cohorts do.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from pipeline.core.artifacts import atomic_outputs, load_npz, write_json, write_tsv
from pipeline.core.cli import params_option, read_keys, run_stage
from pipeline.core.data import CLASSES
from pipeline.core.runtime import pick_device
from pipeline.diffusion.sampler import Sampler, SamplerSettings
from pipeline.evaluation.classifier import binary_metrics, load_classifier
from pipeline.evaluation.fid import fid_from_features, inception_features
from pipeline.evaluation.quality import kid
from pipeline.figures.charts import save_panels
from pipeline.figures.grids import save_rows

SECTION = "guidance_sweep"  # the params.yaml section this stage reads
EXTRA_PARAMS = {"ldm": tuple(SamplerSettings.__dataclass_fields__)}  # ... and the cohort sampler's settings
app = typer.Typer(add_completion=False, help=__doc__)


def stratified_labels(train_labels: np.ndarray, n: int) -> np.ndarray:
    """``n`` labels in the class proportions of the train split (normals first)."""
    counts = np.bincount(train_labels, minlength=len(CLASSES))
    per_class = np.floor(counts / counts.sum() * n).astype(int)
    per_class[-1] += n - per_class.sum()
    return np.repeat(np.arange(len(CLASSES)), per_class)


def score(images: np.ndarray, labels: np.ndarray, ref: np.ndarray, held_out: np.ndarray, evaluator,
          batch_size: int, seed: int) -> dict[str, float]:
    """FID and KID against the train Inception features ``ref``, FID against the held-out val features
    ``held_out``, and label fidelity, of one sampled set."""
    feats = inception_features(images, batch_size, desc="inception")
    fidelity = binary_metrics(evaluator.predict_proba(images), labels, evaluator.threshold)
    kid_mean, _ = kid(feats, ref, 1000, 50, seed)
    return {"fid": fid_from_features(feats, ref), "kid": kid_mean, "fid_val": fid_from_features(feats, held_out),
            "label_fidelity_accuracy": fidelity["accuracy"], "label_fidelity_auc": fidelity["auc"]}


@app.command()
def main(
    ldm: Path = typer.Option(..., help="Diffusion model folder."),
    autoencoder: Path = typer.Option(..., help="Autoencoder model folder."),
    latents: Path = typer.Option(..., help="Latents folder (the class means of the x0 spread)."),
    fid_ref: Path = typer.Option(..., help="Real-image Inception features (output of fid_ref)."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (one key per measure and scale)."),
    curve: Path = typer.Option(..., help="Output TSV, one row per scale, for dvc plots."),
    figure: Path = typer.Option(..., help="Output PNG: FID, KID and label fidelity against the scale."),
    grid: Path = typer.Option(..., help="Output PNG: the same seeds at every scale."),
    params: Path = params_option(),
    scales: list[float] = typer.Option(..., help="Guidance scales to try."),
    n_images: int = typer.Option(..., min=2, help="Images per scale (train class proportions)."),
    seed: int = typer.Option(..., help="Image i uses seed seed + i at every scale; also seeds the KID subsets."),
    batch_size: int = typer.Option(..., min=1, help="Images per sampling batch (no effect on the images)."),
) -> None:
    """Sample the same seeds at each guidance scale; write FID, KID and label fidelity per scale, a plot and a grid."""
    t0 = time.time()
    z = load_npz(fid_ref / "train.npz", ("features", "labels"), "fid_ref")
    ref, ref_labels = z["features"], z["labels"]
    held_out = load_npz(fid_ref / "val.npz", ("features", "labels"), "fid_ref")["features"]
    labels = stratified_labels(ref_labels, n_images)
    seeds = [seed + i for i in range(n_images)]
    cohort = SamplerSettings(**read_keys(params, "ldm", SamplerSettings, "guidance_sweep"))
    sampler = Sampler.from_params(ldm, autoencoder, cohort, pick_device(), latents)
    evaluator = load_classifier(classifier)
    rows, grids, out = [], [], {}
    show = np.concatenate([np.flatnonzero(labels == k)[:6] for k in range(len(CLASSES))])
    for w in scales:
        images = sampler.generate(labels, seeds, w, batch_size, desc=f"guidance {w}")
        s = score(images, labels, ref, held_out, evaluator, 50, seed)
        rows.append({"guidance_scale": w, **{k: round(v, 5) for k, v in s.items()}})
        names = {"fid": f"fid_vs_train_n{len(ref)}", "kid": f"kid_vs_train_n{len(ref)}",
                 "fid_val": f"fid_vs_val_n{len(held_out)}"}
        out.update({f"{names[k]}_sampled_n{n_images}_w{w:g}" if k in names else f"{k}_w{w:g}": round(v, 5)
                    for k, v in s.items()})
        grids.append((f"w={w:g}", images[show]))
        typer.echo(f"guidance {w}: " + " ".join(f"{k}={v:.4f}" for k, v in s.items()), err=True)
    out["selected_guidance_scale"] = min(rows, key=lambda r: r["fid_val"])["guidance_scale"]  # chosen on val only
    out["wall_time_s"] = round(time.time() - t0, 1)
    with atomic_outputs(metrics, curve, figure, grid) as (tmp_metrics, tmp_curve, tmp_figure, tmp_grid):
        write_json(tmp_metrics, out)
        write_tsv(tmp_curve, rows)
        x = [r["guidance_scale"] for r in rows]
        save_panels(tmp_figure, x, {
            f"Inception FID vs held-out val (N {n_images} vs {len(held_out)}; chooses)": {
                "FID": [r["fid_val"] for r in rows]},
            f"Inception FID vs train (N {n_images} vs {len(ref)}; reported)": {"FID": [r["fid"] for r in rows]},
            "KID vs train": {"KID": [r["kid"] for r in rows]},
            "label fidelity (evaluator)": {"accuracy": [r["label_fidelity_accuracy"] for r in rows],
                                           "AUC": [r["label_fidelity_auc"] for r in rows]}},
            "guidance scale w", f"classifier-free guidance sweep, {sampler.num_inference_steps} DDIM steps, "
            f"eta {sampler.eta:g}, guidance at t <= {'/'.join(map(str, sampler.guidance_max_t))}"
            f"{sampler.spread_label()}")
        save_rows(tmp_grid, grids, "same seeds at each guidance scale (6 normal, then 6 pneumonia)")


if __name__ == "__main__":
    run_stage(app, SECTION)
