"""Stage ``counterfactual_baseline``: the far end of the counterfactual trade-off, a fresh sample that forgets the source.

For every source image of the ``counterfactual`` stage (its ``counterfactuals.npz``: the same images, labels and
seeds), a new image of the target class is sampled from the image's own seed exactly as the ``sample`` stage makes the
cohorts (its ``settings.json``), and scored as the edits are: the evaluator's flip rate and SSIM / PSNR / L1 against
the source; the "edit back" and the null edit are a fresh sample of the source class. It flips nearly always and keeps
nothing of the child: what an edit must beat on identity.

It is a stage of its own because it depends on the cohort's sampler settings and the edits do not: ``dvc exp run -S
ldm.guidance_scale=4`` reruns this (a minute), not the edits (``counterfactual``). This stage has no hyperparameters.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, load_npz, write_json
from pipeline.core.cli import run_stage
from pipeline.core.runtime import pick_device
from pipeline.diffusion.sampler import Sampler
from pipeline.evaluation.classifier import load_classifier
from pipeline.evaluation.counterfactual import direction_scores

SECTION = None  # no hyperparameters
BATCH_SIZE = 128  # images per sampling batch: no effect on the images (one seed per image)
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    edits: Path = typer.Option(..., help="The counterfactual stage's npz (sources, labels, seeds)."),
    ldm: Path = typer.Option(..., help="Diffusion model folder (output of train_ldm)."),
    autoencoder: Path = typer.Option(..., help="Autoencoder model folder."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    cohort_settings: Path = typer.Option(..., help="The sample stage's settings.json: the baseline is sampled as the "
                                         "cohorts were."),
    metrics: Path = typer.Option(..., help="Output metrics JSON: baseline_regenerate_<direction>_<measure>."),
) -> None:
    """Sample a fresh image of the target class for every counterfactual source; score it as the edits are scored."""
    t0 = time.time()
    z = load_npz(edits, ("sources", "source_labels", "target_labels", "seeds"), "counterfactual")
    sources, src, tgt, seeds = z["sources"], z["source_labels"], z["target_labels"], z["seeds"].tolist()
    sampler = Sampler.from_settings(ldm, autoencoder, cohort_settings, pick_device())
    evaluator = load_classifier(classifier)
    regen = sampler.generate(tgt, seeds, sampler.guidance_scale, BATCH_SIZE, desc="regenerate baseline")
    regen_src = sampler.generate(src, seeds, sampler.guidance_scale, BATCH_SIZE, desc="regenerate baseline, source")
    result = {f"baseline_regenerate_{k}": v for k, v in
              direction_scores(sources, src, regen, regen_src, regen_src, evaluator).items()}
    result["wall_time_s"] = round(time.time() - t0, 1)
    with atomic_outputs(metrics) as (tmp,):
        write_json(tmp, result)
    typer.echo(" ".join(f"{k}={v}" for k, v in result.items()), err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
