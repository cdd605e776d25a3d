"""Join a running ``tune`` study and run its trials until the study's budget is spent.

The study carries its search space, fixed settings and budget, so a worker needs only where the study lives and the
latents. Start the stage on one machine with a shared storage, then start workers anywhere that reaches it::

    CXR_TUNE_STORAGE=postgresql://user:pw@db/optuna dvc repro tune          # machine A: creates the study
    python -m pipeline.tune_worker --storage postgresql://user:pw@db/optuna \\
        --study ldm --latents data/latents                                 # machines B, C, ...

Each worker stops when the study has ``tune.n_trials`` trials (all workers together) or ``tune.timeout_min`` minutes
have passed since it started. Watch it with ``optuna-dashboard <storage URL>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.core.cli import PipelineError, run_command
from pipeline.diffusion.tune import STORAGE_ENV, open_storage, run_worker

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    latents: Path = typer.Option(..., help="Latents folder (output of encode_latents), as the stage uses."),
    storage: str = typer.Option("", help=f"SQLAlchemy URL of the study (default ${STORAGE_ENV})."),
    study: str = typer.Option("ldm", help="Study name (tune.study_name)."),
    index: int = typer.Option(None, help="Worker index: its TPE sampler uses seed + index (default: the process "
                              "id, so that workers never draw the same random trials)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Run trials of an existing study until its budget is spent; print the trial numbers this worker ran."""
    url = storage or os.environ.get(STORAGE_ENV, "")
    if not url:
        raise PipelineError(f"no storage: pass --storage URL or set ${STORAGE_ENV}")
    ran = run_worker(open_storage(url), study, latents, index=os.getpid() if index is None else index,
                     progress=not quiet)
    typer.echo(f"worker {os.getpid()} ran trials {ran}", err=True)


if __name__ == "__main__":
    run_command(app)
