"""Stage ``check_params``: every section of params.yaml is one a stage reads, every key a stage declares is there.

It depends on the whole params.yaml file, so it runs whenever the file changes. Each stage declares its own section
whole in dvc.yaml (``params: [section]``), so a new or misspelt key inside a section reruns that section's stage, which
rejects it before doing any work (the error names the key and the closest known one); this stage catches what no
stage would see: a misspelt or unknown *section*, a section that is not a mapping, and a key that a stage declares
but the file lacks. This stage has no hyperparameters.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.core.artifacts import atomic_outputs, write_json
from pipeline.core.cli import PipelineError, closest_key, read_params, run_stage
from pipeline.core.pipeline_file import declared_params

SECTION = None  # no hyperparameters
app = typer.Typer(add_completion=False, help=__doc__)


def check(params: dict, declared: dict[str, set[str] | None]) -> None:
    """Raise on a section no stage declares, a section that is not a mapping, or a declared key the file lacks.

    Args:
        params: the params file's content.
        declared: section -> the keys stages declare one by one, or None when a stage declares the whole section.

    Raises:
        PipelineError: naming the section or key, and the closest known section.
    """
    for section, values in params.items():
        if section not in declared:
            near = closest_key(section, list(declared))
            raise PipelineError(f"params section '{section}' is read by no stage"
                                + (f" (did you mean '{near}'?)" if near else "")
                                + f"; the sections are: {', '.join(sorted(declared))}")
        if not isinstance(values, dict):
            raise PipelineError(f"params section '{section}' must be a mapping of keys, got {values!r}")
    for section, keys in declared.items():
        values = params.get(section)
        if values is None:
            raise PipelineError(f"params section '{section}' is missing (dvc.yaml's stages read it)")
        missing = sorted((keys or set()) - set(values))
        if missing:
            raise PipelineError(f"params key(s) {', '.join(f'{section}.{k}' for k in missing)} missing "
                                "(dvc.yaml's stages read them)")


@app.command()
def main(
    params_file: Path = typer.Option(..., help="The params file to check (params.yaml)."),
    pipeline: Path = typer.Option(..., help="dvc.yaml: which stage declares which params."),
    metrics: Path = typer.Option(..., help="Output metrics JSON: sections, keys, wall time."),
) -> None:
    """Check the params file against what dvc.yaml's stages declare; write a one-line summary."""
    t0 = time.time()
    content = read_params(params_file)
    check(content, declared_params(pipeline))
    n_keys = sum(len(v) for v in content.values())
    with atomic_outputs(metrics) as (tmp,):
        write_json(tmp, {"sections": len(content), "keys": n_keys, "wall_time_s": round(time.time() - t0, 2)})
    typer.echo(f"{params_file}: {len(content)} sections, {n_keys} keys, each section read by a stage", err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
