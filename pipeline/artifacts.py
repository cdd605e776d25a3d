"""Writing stage outputs safely, and self-describing model folders.

Every stage writes its outputs through :func:`atomic_outputs`: into temporary siblings first, renamed into place only
when the whole stage succeeded, so a failed or killed run never leaves a half-written output behind.

A model folder holds ``model.safetensors`` (never pickle) and ``config.json`` whose ``args`` are the constructor's
keyword arguments (``AutoencoderKL(**config["args"])``), plus whatever else a consumer needs (``extra``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import PipelineError

__all__ = ["atomic_outputs", "write_json", "save_npz", "save_model", "load_model_config", "load_model", "seed_all",
           "write_tsv"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_outputs(*paths: Path) -> Iterator[list[Path]]:
    """Yield temporary paths to write instead of ``paths``; move them into place only if the block succeeds.

    Directories are created for folder outputs' parents; the caller creates a temporary path as a file or a folder.
    On any exception the temporaries are removed and the old outputs are left untouched.
    """
    tmps = [p.with_name(f".{p.name}.tmp{os.getpid()}") for p in paths]
    for p, tmp in zip(paths, tmps):
        p.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
    try:
        yield tmps
        missing = [str(p) for p, tmp in zip(paths, tmps) if not tmp.exists()]
        if missing:
            raise RuntimeError(f"stage did not write its outputs: {', '.join(missing)}")
    except BaseException:
        for tmp in tmps:
            _remove(tmp)
        raise
    for p, tmp in zip(paths, tmps):
        _remove(p)
        os.replace(tmp, p)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON (indented, keys in insertion order, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows of equal keys as a tab-separated table (for ``dvc plots``)."""
    keys = list(rows[0]) if rows else []
    lines = ["\t".join(keys)] + ["\t".join(_fmt(r[k]) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Save arrays uncompressed to ``path`` (exact name, no ``.npz`` appended)."""
    with path.open("wb") as f:
        np.savez(f, **arrays)


def save_model(folder: Path, model: torch.nn.Module, name: str, args: dict[str, Any], **extra: Any) -> None:
    """Save ``model`` as ``folder/model.safetensors`` + ``folder/config.json`` (class name, constructor args,
    extras)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    write_json(folder / "config.json", {"class": name, "args": args, **extra})


def load_model_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder, with a clear error when the folder is not a model."""
    path = folder / "config.json"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        raise PipelineError(f"{folder} is not a model folder (needs config.json and model.safetensors); "
                            "run the stage that trains it first")
    return json.loads(path.read_text())


def load_model(folder: Path, registry: dict[str, type[torch.nn.Module]]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from its folder: ``registry[config["class"]](**config["args"])`` with the saved weights.

    Returns:
        The model in eval mode on the CPU, and its config.
    """
    config = load_model_config(folder)
    model = registry[config["class"]](**config["args"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), config


def seed_all(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
