"""Write the README's two generated tables, so that no figure there is typed by hand:

- between ``<!-- results:start -->`` and ``<!-- results:end -->``: every target of
  :mod:`pipeline.evaluation.targets` against the committed ``metrics/`` files;
- between ``<!-- stage-table:start -->`` and ``<!-- stage-table:end -->``: from ``metrics/pipeline_time.json``
  (benchmarks/pipeline_time.py), per stage what it does (the first sentence of its module docstring), its minutes in
  the full run and in the guidance experiment, and the totals.

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.evaluation.targets import evaluate_targets  # noqa: E402


def summary(module: str) -> str:
    """The first sentence of a stage module's docstring, without its ``Stage ``name``:`` prefix."""
    doc = ast.get_docstring(ast.parse((REPO / "pipeline" / f"{module}.py").read_text())) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r"^Stage ``\w+``( \([^)]*\))?:\s*", "", text)
    text = re.sub(r" \([^()]*:(?:class|mod|func):[^()]*\)", "", text)  # cross-references are for the code
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return first.replace("``", "`").replace("|", "\\|")


def minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f}"


def table(times: dict, stages: dict) -> str:
    full, exp = times.get("stage_s", {}), times.get("guidance_experiment_stage_s", {})
    rows = ["| stage | what it does | min, full run | min, `-S ldm.guidance_scale=4` |", "|---|---|---|---|"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2].split(".", 1)[1]
        rows.append(f"| `{name}` | {summary(module)} | {minutes(full.get(name))} | {minutes(exp.get(name))} |")
    rows.append(f"| **total** | full `dvc repro` from nothing; no-op repro {times.get('noop_s', 0):.1f} s | "
                f"**{minutes(times.get('repro_total_s'))}** | **{minutes(times.get('guidance_experiment_s'))}** |")
    cpu = (f"{times.get('cpu_model', '?')}, {times.get('cpu_cores', '?')} cores, "
           f"{times.get('torch_threads', '?')} torch threads")
    return "\n".join(rows) + f"\n\nMeasured on {cpu}."


def results() -> str:
    """The targets table from the committed metrics files."""
    metrics = {p.name: json.loads(p.read_text()) for p in (REPO / "metrics").glob("*.json")}
    rows = ["| target | bound | measured | |", "|---|---|---|---|"]
    for r in evaluate_targets(metrics):
        value = "not measured" if r["value"] is None else format(r["value"], r["fmt"])
        state = "" if r["met"] is None else ("met" if r["met"] else "**missed**")
        rows.append(f"| {r['label']} | {r['op']} {format(r['bound'], r['fmt'])} | {value} | {state} |")
    return "\n".join(rows)


def fill(text: str, name: str, block: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"


def main() -> None:
    times = json.loads((REPO / "metrics" / "pipeline_time.json").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    readme = REPO / "README.md"
    text = fill(readme.read_text(), "results", results())
    readme.write_text(fill(text, "stage-table", table(times, stages)))


if __name__ == "__main__":
    main()
