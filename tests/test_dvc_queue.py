"""Parallel experiments with DVC's own queue: two `dvc exp run --queue -S …`, then `dvc queue start -j 2`, on a copy of
the tiny project of tests/dvc_project.py; both results appear in `dvc exp show` with their params and metrics (README,
Scale out). The experiments change `sampling_speed.n_images`, whose stage is the smallest that samples (with
`check_params` and `report`), so the test times the queue rather than the tiny pipeline (a guidance experiment reruns
sample and its whole downstream: 233 s for two, against the queue's own seconds)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvc_project import dvc, project_copy

SCALES = {"speed2": 2, "speed3": 3}  # experiment name -> sampling_speed.n_images


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    return project_copy(tmp_path_factory, "project_queue")


def experiments(tree) -> Iterator[dict]:
    """Every experiment record of ``dvc exp show --json`` (a nested list of revisions), wherever it sits."""
    if isinstance(tree, list):
        for node in tree:
            yield from experiments(node)
    elif isinstance(tree, dict):
        if tree.get("name") and isinstance(tree.get("data"), dict):
            yield tree
        for value in tree.values():
            if isinstance(value, (list, dict)):
                yield from experiments(value)


def queue_states(project: Path) -> dict[str, str]:
    """Task name -> status (Queued, Running, Success, Failed...) from ``dvc queue status``."""
    states = {}
    for line in dvc(project, "queue", "status").stdout.splitlines():
        words = line.split()  # task id, name, created, status
        for name in SCALES:
            if name in words[1:2]:
                states[name] = words[-1]
    return states


def test_two_queued_experiments_run_in_parallel_and_show_up(project):
    for name, value in SCALES.items():
        dvc(project, "exp", "run", "--queue", "-S", f"sampling_speed.n_images={value}", "--name", name)
    assert set(queue_states(project).values()) == {"Queued"}
    dvc(project, "queue", "start", "-j", "2")
    try:
        end, states = time.monotonic() + 1200, {}
        while time.monotonic() < end:
            states = queue_states(project)
            if states and all(s in ("Success", "Failed") for s in states.values()) and len(states) == len(SCALES):
                break
            time.sleep(5)
        assert states == {name: "Success" for name in SCALES}, (states, dvc(project, "queue", "logs",
                                                                             next(iter(SCALES))).stdout[-3000:])
    finally:
        dvc(project, "queue", "stop", "--kill")
    shown = {e["name"]: e["data"] for e in experiments(json.loads(dvc(project, "exp", "show", "--json").stdout))}
    for name, value in SCALES.items():
        assert name in shown, sorted(shown)
        data = shown[name]
        assert data["params"]["params.yaml"]["data"]["sampling_speed"]["n_images"] == value
        assert data["metrics"]["metrics/sampling_speed.json"]["data"]["n_images"] == value  # each ran its own stage
