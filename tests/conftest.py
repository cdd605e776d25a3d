"""Shared fixtures: a medmnist root seeded from the real PneumoniaMNIST file, the tiny params profile, and one run of
the real pipeline stages on it (each test then checks what it needs)."""

from __future__ import annotations

import inspect
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

# Under pytest-xdist (pyproject.toml: one worker per core), each worker and the stages it starts get their share of
# the cores, so that N workers do not each start a thread per core. Set before torch is first imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

from pipeline.core.cli import command_defaults, run_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "params_tiny.yaml"
REAL_NPZ = Path(os.environ.get("PNEUMONIAMNIST_NPZ", REPO.parent / "shared" / "data" / "pneumoniamnist.npz"))


# With whole files per xdist worker the longest file bounds the suite, so it is scheduled first. It builds the shared
# tiny `dvc repro` project (tests/dvc_project.py); the other files that need it go last, by when it is built.
FIRST = ("test_dvc.py",)
LAST = ("test_dvc_sampling.py", "test_dvc_queue.py", "test_report.py", "test_reader_study.py", "test_browser.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the test files for the workers: :data:`FIRST` first, :data:`LAST` last, the rest as collected."""
    items.sort(key=lambda item: 0 if item.path.name in FIRST else 2 if item.path.name in LAST else 1)


def default_params() -> dict:
    """A fresh copy of the repository's default params.yaml (the profile of the committed run)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="session")
def real_npz() -> Path:
    if not REAL_NPZ.is_file():
        pytest.fail(f"real data {REAL_NPZ} not found: put pneumoniamnist.npz (MD5 28209eda62fecd6e6a2d98b1501bb15f) "
                    "in ../shared/data/ or set $PNEUMONIAMNIST_NPZ")
    return REAL_NPZ


@pytest.fixture(scope="session")
def medmnist_root(tmp_path_factory: pytest.TempPathFactory, real_npz: Path) -> Path:
    """A medmnist root holding a copy of the real 28×28 file; $MEDMNIST_ROOT points at it for the whole session."""
    root = tmp_path_factory.mktemp("medmnist")
    shutil.copy(real_npz, root / real_npz.name)
    os.environ["MEDMNIST_ROOT"] = str(root)
    return root


def write_params(path: Path, **overrides: dict) -> Path:
    """Write the tiny profile to ``path`` with some sections updated, e.g. ``data={"size": 32}``."""
    params = yaml.safe_load(TINY.read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run(module: str, args: Sequence[str]) -> int:
    """Run a stage in-process exactly as ``python -m pipeline.<module> args`` would; return its exit code."""
    mod = __import__(f"pipeline.{module}", fromlist=["app"])
    sys.argv = [f"{module}.py", *map(str, args)]
    try:
        run_stage(mod.app, mod.SECTION, argv=list(map(str, args)))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def invoke_command(module: ModuleType, args: Sequence[str], params: Path) -> Result:
    """Invoke a user command (generate, edit) in-process with CliRunner, its defaults from ``params`` as
    ``python -m pipeline.<name> --params params`` sets them (:func:`pipeline.core.cli.command_defaults`)."""
    argv = [*map(str, args), "--params", str(params)]
    return CliRunner().invoke(module.app, argv, default_map=command_defaults(module.app, module.SECTION, argv, False))


def run_subprocess(module: str, args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a stage as a separate ``python -m`` process (to see its real exit code and stderr)."""
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@dataclass
class Workspace:
    """Where the session's tiny pipeline run wrote its outputs."""

    root: Path
    params: Path

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel


# the stages the session's in-process run covers, in dvc.yaml order (utility, its real runs, the reader study and the
# report run in the tiny `dvc repro` project of tests/dvc_project.py)
FIXTURE_STAGES = ("prepare", "fid_ref", "train_autoencoder", "evaluate_autoencoder", "encode_latents", "train_classifier",
                  "train_guide", "tune", "train_ldm", "sample", "fid", "privacy", "guidance_sweep", "counterfactual",
                  "counterfactual_baseline", "sampling_speed")


def stage_args(name: str, ws: "Workspace") -> list:
    """A stage's command-line options as dvc.yaml gives them, every path moved into the workspace."""
    words = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]["cmd"])[3:]
    return [w if w.startswith("--") else ws / w for w in words]


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Workspace:
    """Run every stage, in pipeline order, on the tiny profile."""
    ws = Workspace(tmp_path_factory.mktemp("ws"), Path())
    ws.params = write_params(ws / "params.yaml")
    p = ["--params", ws.params]
    steps = [(name, stage_args(name, ws)) for name in FIXTURE_STAGES]
    for module, args in steps:
        mod = __import__(f"pipeline.{module}", fromlist=["app"])
        takes_params = "params" in inspect.signature(mod.app.registered_commands[0].callback).parameters
        code = run(module, args + (p if takes_params else []))
        assert code == 0, f"stage {module} failed with exit code {code}"
    return ws
