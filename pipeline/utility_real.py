"""Stage ``utility_real``: the evaluator's recipe retrained on shares of the real train split alone, the baselines of
the ``utility`` stage.

For each share p of ``utility.fractions`` (1.0 always) and each of ``utility.seeds``, a stratified, seeded subset of the
real train split is trained with the evaluator's recipe under ``utility.budget`` (see the ``utility`` stage), selected
on real val and scored on real test. These runs do not depend on the synthetic cohort, so they are a stage of their
own: ``dvc exp run -S ldm.guidance_scale=4`` reruns only the runs with synthetic images. Writes the per-seed scores for
the ``utility`` stage. Reads ``utility.fractions``, ``utility.seeds``, ``utility.budget`` and the ``classifier``
recipe (every key but seed).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, write_json
from pipeline.core.cli import params_option, read_keys, run_stage
from pipeline.core.data import real_images
from pipeline.evaluation.classifier import Recipe
from pipeline.evaluation.utility import UtilityPlan, check_options, plan, run_regimes

SECTION = None  # its keys are the utility section's, owned by the utility stage
EXTRA_PARAMS = {"utility": tuple(UtilityPlan.__dataclass_fields__), "classifier": tuple(Recipe.__dataclass_fields__)}
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared real data (output of prepare): train, val and test splits."),
    out: Path = typer.Option(..., help="Output JSON: per regime and seed, the test scores of each run."),
    metrics: Path = typer.Option(..., help="Output metrics JSON: runs and wall time."),
    params: Path = params_option(),
) -> None:
    """Train the real-only regimes of the utility study; write their per-seed test scores."""
    t0 = time.time()
    settings = UtilityPlan(**read_keys(params, "utility", UtilityPlan, "utility_real"))
    check_options(settings.fractions, settings.seeds, 1.0)
    recipe = Recipe.from_params(read_keys(params, "classifier", Recipe, "utility_real"))
    real, val, test = (real_images(data, split) for split in ("train", "val", "test"))
    regimes = [r for r in plan(settings.fractions) if not r.synthetic]
    results = run_regimes(regimes, settings.seeds, real, val, test, None, 1.0, recipe, settings.budget)
    runs = {r.name: [{"seed": s, **scores} for s, scores in zip(settings.seeds, per_seed)]
            for r, per_seed in results.items()}
    with atomic_outputs(out, metrics) as (tmp, tmp_metrics):
        write_json(tmp, {"runs": runs})
        write_json(tmp_metrics, {"n_runs": sum(len(v) for v in runs.values()), "wall_time_s": round(time.time() - t0, 1)})
    typer.echo(f"utility_real: {sum(len(v) for v in runs.values())} runs -> {out}", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
