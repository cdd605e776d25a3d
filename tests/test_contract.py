"""The house rules, checked: dvc.yaml, params.yaml, the tiny profile, each stage's options and the import graph agree.

- an entry point (``pipeline/<stage>.py``, ``generate``, ``edit``, ``tune_worker``) imports only the library
  subpackages (``pipeline.core``, ``pipeline.diffusion``...), never another entry point;
- params.yaml is the one source of every default: no stage option has a default in code, the user commands'
  options that share a name with their section's keys take the section's value, and ``--help`` shows it;
- a stage declares exactly the params it reads, each section has one owner, its deps are exactly the code it imports,
  its command passes every path (each a dep or an out), and every metrics file is listed and left out of the cache.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import default_params

from pipeline.core.cli import stage_options

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = default_params()
STAGES = DVC["stages"]
ENTRY_POINTS = sorted(p.stem for p in (REPO / "pipeline").glob("*.py") if p.stem != "__init__")
USER_COMMANDS = ("generate", "edit")
# check_params reads dvc.yaml itself (which stage declares what); DVC forbids dvc.yaml as a dep, so that one path is
# neither a dep nor an out
NOT_DEPS = {"check_params": {"dvc.yaml"}}


def module_of(stage: dict) -> str:
    words = shlex.split(stage["cmd"])
    assert words[:2] == ["python", "-m"] and words[2].startswith("pipeline."), stage["cmd"]
    return words[2]


def cmd_options(stage: dict) -> dict[str, str]:
    words = shlex.split(stage["cmd"])[3:]
    return dict(zip(words[::2], words[1::2]))


def out_paths(stage: dict) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}


def source_file(module: str) -> Path:
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def direct_imports(module: str) -> set[str]:
    """The ``pipeline`` modules ``module`` imports anywhere in its source (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:  # `from pipeline.diffusion import tune` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if source_file(sub).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
    return {m for m in found if source_file(m).is_file()}


def is_code(module: str) -> bool:
    """False for an empty package ``__init__`` (importing it runs nothing, so it is no dep)."""
    return bool(source_file(module).read_text().strip())


def pipeline_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """``pipeline`` modules imported by ``module``, transitively (with each package's ``__init__``)."""
    seen = set() if seen is None else seen
    for dep in direct_imports(module):
        parts = dep.split(".")
        for k in range(2, len(parts)):  # importing pipeline.core.cli runs pipeline/core/__init__.py
            seen.add(".".join(parts[:k]))
        if dep not in seen:
            seen.add(dep)
            pipeline_imports(dep, seen)
    return seen


def declared(stage: dict) -> set[str]:
    keys = set()
    for key in stage.get("params", []):  # a bare section name declares every key of that section
        keys |= {f"{key}.{k}" for k in PARAMS[key]} if "." not in key else {key}
    return keys


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_import_only_library_subpackages(name):
    imported = direct_imports(f"pipeline.{name}")
    entry = {m for m in imported if m.count(".") == 1 and (REPO / (m.replace(".", "/") + ".py")).is_file()}
    assert not entry, f"pipeline/{name}.py imports the entry point(s) {sorted(entry)}: move the shared code into a library"


@pytest.mark.parametrize("name", [m for m in ENTRY_POINTS if m not in USER_COMMANDS + ("tune_worker",)])
def test_stage_options_have_no_default_in_code(name):
    mod = importlib.import_module(f"pipeline.{name}")
    signature = inspect.signature(mod.app.registered_commands[0].callback)
    for key in stage_options(mod.app):
        default = signature.parameters[key].default.default  # typer.Option(default, ...)
        assert default is ... or default is None, f"{name}: option {key} defaults to {default!r} in code"


@pytest.mark.parametrize("name", USER_COMMANDS)
def test_user_commands_take_their_defaults_from_their_section(name):
    mod = importlib.import_module(f"pipeline.{name}")
    section = PARAMS[mod.SECTION]
    signature = inspect.signature(mod.app.registered_commands[0].callback)
    shared = set(stage_options(mod.app)) & set(section)
    assert len(shared) >= 5, shared
    for key in shared:
        default = signature.parameters[key].default.default
        assert default is ... or default is None, f"{name}: option {key} defaults to {default!r} in code"


@pytest.mark.parametrize("name,key", [("sample", ("ldm", "guidance_scale")), ("train_ldm", ("train_ldm", "epochs")),
                                      ("edit", ("counterfactual", "strength_rule"))])
def test_help_shows_the_params_value(name, key):
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{name}", "--help"], cwd=REPO, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "COLUMNS": "250", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    value = PARAMS[key[0]][key[1]]
    option = "--" + key[1].replace("_", "-")
    lines = proc.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"\W*{option}\b", ln))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\W*--[a-z]", lines[i])), len(lines))
    block = " ".join(lines[start:end])  # the option's help, over its wrapped lines
    assert f"default: {value}" in block and "required" not in block, block


@pytest.mark.parametrize("name", list(STAGES))
def test_declared_params_are_exactly_what_the_stage_reads(name):
    stage = STAGES[name]
    mod = importlib.import_module(module_of(stage))
    expected = {f"{mod.SECTION}.{key}" for key in stage_options(mod.app)} if mod.SECTION else set()
    # a stage may also read keys of another stage's section (utility: the evaluator's recipe), named in EXTRA_PARAMS
    for section, keys in getattr(mod, "EXTRA_PARAMS", {}).items():
        assert set(keys) <= set(PARAMS[section]), f"{name} reads keys missing from params section {section}"
        expected |= {f"{section}.{key}" for key in keys}
    assert declared(stage) == expected


def test_each_section_has_one_owner_whose_options_are_its_keys():
    owners: dict[str, list[str]] = {}
    for name, stage in STAGES.items():
        mod = importlib.import_module(module_of(stage))
        if mod.SECTION:
            owners.setdefault(mod.SECTION, []).append(name)
            assert set(PARAMS[mod.SECTION]) == set(stage_options(mod.app)), mod.SECTION
    assert set(owners) == set(PARAMS)
    assert all(len(v) == 1 for v in owners.values()), owners


@pytest.mark.parametrize("name", list(STAGES))
def test_cmd_passes_every_path_and_only_paths(name):
    stage = STAGES[name]
    mod = importlib.import_module(module_of(stage))
    signature = inspect.signature(mod.app.registered_commands[0].callback)
    path_options = {"--" + p.replace("_", "-") for p, v in signature.parameters.items()
                    if v.annotation in (Path, "Path") and p != "params"}
    options = cmd_options(stage)
    assert set(options) - {"--params"} == path_options
    deps, outs = set(stage.get("deps", [])), out_paths(stage)
    for value in options.values():
        folder_of_deps = any(d.startswith(value + "/") for d in deps)  # report: a folder, its files read are deps
        if value != "params.yaml" and not folder_of_deps:
            assert value in deps | outs | NOT_DEPS.get(name, set()), f"{name}: path {value} is neither a dep nor an out"


@pytest.mark.parametrize("name", list(STAGES))
def test_deps_are_exactly_the_code_the_stage_runs(name):
    stage = STAGES[name]
    module = module_of(stage)
    needed = {str(source_file(m).relative_to(REPO)) for m in pipeline_imports(module) | {module} if is_code(m)}
    code = {d for d in stage["deps"] if d.startswith("pipeline/")}
    assert code == needed, f"missing {sorted(needed - code)}, not imported {sorted(code - needed)}"


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
