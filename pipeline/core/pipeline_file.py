"""Reading dvc.yaml, the one place where paths and the params each stage reads are written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.core.cli import PipelineError

__all__ = ["read_pipeline", "declared_params"]


def read_pipeline(path: Path) -> dict[str, Any]:
    """The stages of a dvc.yaml file, with a one-line error when it is missing or not YAML."""
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"cannot read the pipeline file {path}: {type(exc).__name__}") from None
    stages = content.get("stages") if isinstance(content, dict) else None
    if not isinstance(stages, dict):
        raise PipelineError(f"{path} has no stages")
    return stages


def declared_params(path: Path) -> dict[str, set[str] | None]:
    """Section -> the keys stages of ``path`` declare one by one (``section.key``), or None where a stage declares
    the whole section (``params: [section]``)."""
    out: dict[str, set[str] | None] = {}
    for stage in read_pipeline(path).values():
        for entry in stage.get("params", []):
            if not isinstance(entry, str):
                continue  # params of another file ({file.yaml: [keys]}) are not this file's
            section, _, key = entry.partition(".")
            if not key:
                out[section] = None  # the whole section: its own stage checks every key
            elif section not in out:
                out[section] = {key}
            elif out[section] is not None:
                out[section].add(key)
    return out
