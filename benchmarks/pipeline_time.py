"""How long the pipeline takes on this machine: in a scratch clone of the repository, the default `dvc repro` from
nothing, then a no-op `dvc repro`, then the user's experiment `dvc exp run -S ldm.guidance_scale=4`.

Writes ``metrics/pipeline_time.json`` (into the scratch clone and, with ``--copy-back``, into this checkout together
with the run's ``dvc.lock`` and ``metrics/``): per-stage wall seconds of the full run and of the experiment (from the
time each "Running stage" line appears to the next), ``repro_total_s``, ``noop_s``, ``guidance_experiment_s``, the CPU
model, core and thread counts. The README's stage table is generated from this file (``benchmarks/readme_tables.py``).

    python benchmarks/pipeline_time.py --scratch /tmp/bench --copy-back
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, help=__doc__)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def timed_dvc(cwd: Path, args: list[str], log: Path) -> tuple[float, dict[str, float]]:
    """Run ``dvc args`` in ``cwd``, streaming its output to ``log``; return the wall seconds and, per stage it ran,
    the seconds from its "Running stage" line to the next stage's (the last one: to the end)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    t0 = time.perf_counter()
    starts: list[tuple[str, float]] = []
    with log.open("a") as out:
        out.write(f"\n$ dvc {' '.join(args)}\n")
        proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if line.startswith("Running stage '"):
                starts.append((line.split("'")[1], time.perf_counter()))
        code = proc.wait()
    end = time.perf_counter()
    if code:
        raise SystemExit(f"dvc {' '.join(args)} failed with exit code {code}; see {log}")
    stages = {name: round((starts[i + 1][1] if i + 1 < len(starts) else end) - t, 1)
              for i, (name, t) in enumerate(starts)}
    return round(end - t0, 1), stages


@app.command()
def main(
    scratch: Path = typer.Option(..., help="Folder for the scratch clone (emptied first)."),
    copy_back: bool = typer.Option(False, help="Copy dvc.lock, metrics/ and pipeline_time.json into this checkout."),
    experiment: bool = typer.Option(True, help="Also time `dvc exp run -S ldm.guidance_scale=4`."),
    experiment_only: bool = typer.Option(False, help="Time only the guidance experiment, in the scratch clone of an "
                                         "earlier run of this command (killed after its full and no-op runs), and add "
                                         "it to that run's pipeline_time.json."),
) -> None:
    """Time the full default run, a no-op run and the guidance experiment in a scratch clone."""
    out = REPO / "metrics" if copy_back else scratch / "metrics"
    if experiment_only:
        result = json.loads((out / "pipeline_time.json").read_text())
        if "repro_total_s" not in result or not (scratch / "dvc.lock").is_file():
            raise SystemExit(f"no finished full run to add the experiment to in {scratch} / {out}")
        result["guidance_experiment_s"], result["guidance_experiment_stage_s"] = timed_dvc(
            scratch, ["exp", "run", "-S", "ldm.guidance_scale=4"], scratch.parent / f"{scratch.name}.log")
        (out / "pipeline_time.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    shutil.rmtree(scratch, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(scratch)], check=True)
    log = scratch.parent / f"{scratch.name}.log"
    log.write_text("")
    for stale in ["dvc.lock", *map(str, (scratch / "metrics").glob("*.json"))]:
        (scratch / stale).unlink(missing_ok=True)  # from nothing: no lock, no previous metrics
    result: dict = {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
                    "torch_threads": int(subprocess.run(
                        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                        text=True, check=True).stdout)}
    result["repro_total_s"], result["stage_s"] = timed_dvc(scratch, ["repro"], log)
    result["noop_s"], ran = timed_dvc(scratch, ["repro"], log)
    assert not ran, f"a second dvc repro ran {sorted(ran)}"
    if copy_back:  # the default run's lock, metrics and plots, before the experiment changes the workspace
        shutil.copy(scratch / "dvc.lock", REPO / "dvc.lock")
        for path in (scratch / "metrics").rglob("*"):
            if path.is_file():
                dest = REPO / path.relative_to(scratch)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest)
    (out / "pipeline_time.json").write_text(json.dumps(result, indent=2) + "\n")
    if experiment:
        result["guidance_experiment_s"], result["guidance_experiment_stage_s"] = timed_dvc(
            scratch, ["exp", "run", "-S", "ldm.guidance_scale=4"], log)
    (out / "pipeline_time.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
