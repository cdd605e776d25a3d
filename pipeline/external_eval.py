"""Stage ``external_eval``: how the models fare on external pediatric chest X-rays (VinDr-PCXR, or any DICOM folder
laid out the same way; see :mod:`pipeline.formats.external` for the layout, the DICOM reading and the preprocessing).

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

import typer

from pipeline.core.artifacts import atomic_outputs, load_model_config, write_json
from pipeline.core.cli import params_option, run_stage
from pipeline.evaluation.external import evaluate, finite
from pipeline.formats.external import COUNT_KEYS, how_to_get_vindr, load_external

SECTION = "external"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (the in-domain test split, for comparison)."),
    autoencoder: Path = typer.Option(..., help="Autoencoder model folder."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    samples: Path = typer.Option(..., help="Samples folder (output of sample): cohort_matched.npz."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    params: Path = params_option(),
    root: str = typer.Option(..., help="Folder in the VinDr-PCXR layout (<split>/<image_id>.dicom, "
                             "image_labels_<split>.csv); empty or missing: no external data, nothing evaluated."),
    splits: list[str] = typer.Option(..., help="Splits of the external folder to read."),
    normal_label: str = typer.Option(..., help="Labels-CSV column meaning normal."),
    pneumonia_labels: list[str] = typer.Option(..., help="Labels-CSV columns meaning pneumonia."),
    max_images: Optional[int] = typer.Option(None, min=1, help="Read at most this many labelled images (the first "
                                             "in split, then image_id, order); null reads all."),
    kid_subset_size: int = typer.Option(..., min=2, help="Images per KID subset (capped at N)."),
    kid_subsets: int = typer.Option(..., min=1, help="Number of KID subsets."),
    seed: int = typer.Option(..., help="Seed of the KID subset draws."),
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


if __name__ == "__main__":
    run_stage(app, SECTION)
