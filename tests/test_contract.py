"""dvc.yaml, params.yaml, the tiny profile and each stage's command-line options agree with one another."""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import default_params
from pipeline.cli import stage_options

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = default_params()
STAGES = DVC["stages"]


def module_of(stage: dict) -> str:
    match = re.match(r"python -m (pipeline\.\w+)", stage["cmd"])
    assert match, stage["cmd"]
    return match.group(1)


def cmd_options(stage: dict) -> dict[str, str]:
    words = shlex.split(stage["cmd"])[3:]
    return dict(zip(words[::2], words[1::2]))


def out_paths(stage: dict) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}


def pipeline_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """pipeline modules imported by ``module``, transitively."""
    seen = set() if seen is None else seen
    source = (REPO / (module.replace(".", "/") + ".py")).read_text()
    for dep in re.findall(r"^from (pipeline\.\w+) import", source, flags=re.M):
        if dep not in seen:
            seen.add(dep)
            pipeline_imports(dep, seen)
    return seen


@pytest.mark.parametrize("name", list(STAGES))
def test_declared_params_are_exactly_what_the_stage_reads(name):
    stage = STAGES[name]
    mod = importlib.import_module(module_of(stage))
    expected = {f"{mod.SECTION}.{key}" for key in stage_options(mod.app)} if mod.SECTION else set()
    # a stage may also read keys of another stage's section (utility: the evaluator's recipe), named in EXTRA_PARAMS
    for section, keys in getattr(mod, "EXTRA_PARAMS", {}).items():
        assert set(keys) <= set(PARAMS[section]), f"{name} reads keys missing from params section {section}"
        expected |= {f"{section}.{key}" for key in keys}
    declared = set()
    for key in stage.get("params", []):  # a bare section name (tune) declares every key of that section
        declared |= {f"{key}.{k}" for k in PARAMS[key]} if "." not in key else {key}
    assert declared == expected


@pytest.mark.parametrize("name", list(STAGES))
def test_cmd_passes_every_path_and_only_paths(name):
    stage = STAGES[name]
    mod = importlib.import_module(module_of(stage))
    signature = inspect.signature(mod.app.registered_commands[0].callback)
    path_options = {"--" + p.replace("_", "-") for p, v in signature.parameters.items()
                    if v.annotation in (Path, "Path") and p != "params"}
    options = cmd_options(stage)
    assert set(options) == path_options
    deps, outs = set(stage.get("deps", [])), out_paths(stage)
    for value in options.values():
        assert value in deps | outs, f"{name}: path {value} is neither a dep nor an out"


@pytest.mark.parametrize("name", list(STAGES))
def test_deps_cover_the_code_the_stage_runs(name):
    stage = STAGES[name]
    module = module_of(stage)
    needed = {m.replace(".", "/") + ".py" for m in pipeline_imports(module) | {module}}
    assert needed <= set(stage["deps"]), needed - set(stage["deps"])


def test_params_sections_have_no_orphan_keys():
    readers: dict[str, set[str]] = {}
    for stage in STAGES.values():
        mod = importlib.import_module(module_of(stage))
        if mod.SECTION:
            readers.setdefault(mod.SECTION, set()).update(stage_options(mod.app))
    assert set(PARAMS) == set(readers)
    for section, keys in readers.items():
        assert set(PARAMS[section]) == keys, section


def test_tiny_profile_has_the_same_keys():
    tiny = yaml.safe_load((REPO / "tests/params_tiny.yaml").read_text())
    assert {s: set(v) for s, v in tiny.items()} == {s: set(v) for s, v in PARAMS.items()}


def test_every_metrics_file_is_listed_and_not_cached():
    listed = set(DVC["metrics"])
    for stage in STAGES.values():
        for out in stage.get("outs", []):
            if isinstance(out, dict):
                (path, opts), = out.items()
                if path.startswith("metrics/"):
                    assert opts.get("cache") is False, path
                    if path.endswith(".json"):
                        assert path in listed, path
