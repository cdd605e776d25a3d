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

from pipeline.core.cli import PipelineError

__all__ = ["atomic_outputs", "remove_stale_temporaries", "write_json", "save_npz", "load_npz", "save_model",
           "load_model_config", "load_model", "seed_all", "write_tsv"]

TMP_INFIX = ".tmp"
"""Temporary outputs are ``.<name>.tmp<pid>`` beside the output (ignored by git: ``.gitignore``)."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary outputs of ``path`` (``.<name>.tmp<pid>``) that a killed process left behind.

    A temporary whose process still runs is kept (it may be another run writing right now).

    Returns:
        The paths removed.
    """
    removed = []
    prefix = f".{path.name}{TMP_INFIX}"
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.iterdir():
        pid = tmp.name[len(prefix):]
        if tmp.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_outputs(*paths: Path) -> Iterator[list[Path]]:
    """Yield temporary paths to write instead of ``paths``; move them into place only if the block succeeds.

    Directories are created for folder outputs' parents; the caller creates a temporary path as a file or a folder.
    On any exception (and on SIGTERM, which :mod:`pipeline.core.runtime` turns into one) the temporaries are removed
    and the old outputs are left untouched; temporaries of killed earlier runs are removed first.
    """
    tmps = [p.with_name(f".{p.name}{TMP_INFIX}{os.getpid()}") for p in paths]
    for p, tmp in zip(paths, tmps):
        p.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(p)
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


def load_npz(path: Path, keys: tuple[str, ...], stage: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz file, read once, with a one-line error when the file is missing, unreadable
    or lacks a key.

    Args:
        path: the npz file.
        keys: the arrays wanted.
        stage: the stage that writes it, named in the error (``dvc repro <stage>``).

    Raises:
        PipelineError: the file is missing or truncated, or lacks one of ``keys``.
    """
    how = f"rebuild it with `dvc repro {stage}` (or `dvc pull`)"
    if not path.is_file():
        raise PipelineError(f"{path} not found: {how}")
    try:
        with np.load(path) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise PipelineError(f"{path} lacks the array(s) {', '.join(missing)} (it has {', '.join(z.files)}): "
                                    f"{how}")
            return {k: z[k] for k in keys}
    except PipelineError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, ValueError of a truncated or foreign file
        raise PipelineError(f"{path} is unreadable ({type(exc).__name__}): {how}") from None


def save_model(folder: Path, model: torch.nn.Module, name: str, args: dict[str, Any], stage: str,
               **extra: Any) -> None:
    """Save ``model`` as ``folder/model.safetensors`` + ``folder/config.json`` (class name, constructor args, the
    stage that wrote it, extras)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    write_json(folder / "config.json", {"class": name, "args": args, "written_by": stage, **extra})


def _rebuild_hint(folder: Path, config: dict[str, Any] | None = None) -> str:
    stage = (config or {}).get("written_by")
    return f"`dvc repro {stage}` (or `dvc pull`)" if stage else "the stage that writes it (or `dvc pull`)"


def load_model_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder, with a one-line error when the folder is not a model."""
    path = folder / "config.json"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        raise PipelineError(f"{folder} is not a model folder (needs config.json and model.safetensors); "
                            f"run {_rebuild_hint(folder)} first")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PipelineError(f"{path} is not valid JSON: rebuild it with {_rebuild_hint(folder)}") from None


def load_model(folder: Path, registry: dict[str, type[torch.nn.Module]]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from its folder: ``registry[config["class"]](**config["args"])`` with the saved weights.

    Returns:
        The model in eval mode on the CPU, and its config.

    Raises:
        PipelineError: the folder is not a model of ``registry``, or its weights are truncated or do not fit.
    """
    config = load_model_config(folder)
    if config.get("class") not in registry:
        raise PipelineError(f"{folder} holds a {config.get('class')!r}, not one of {', '.join(registry)}")
    model = registry[config["class"]](**config["args"])
    weights = folder / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # SafetensorError of a truncated file, RuntimeError of weights of another shape
        raise PipelineError(f"{weights} is unreadable or does not fit {config['class']}({type(exc).__name__}): "
                            f"rebuild it with {_rebuild_hint(folder, config)}") from None
    return model.eval(), config


def seed_all(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
