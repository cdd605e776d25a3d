"""What the training loops share: the one-cycle learning-rate schedule, and checkpoints to resume a killed run from.

A checkpoint lives outside the stage's outputs (the folder ``.<output name>.checkpoint`` beside the output, e.g.
``models/.ldm.checkpoint``, ignored by git and DVC), is written atomically at the end of every epoch, and carries a
fingerprint of the run (its settings and the hash of its inputs): a rerun with the same fingerprint resumes from it,
a rerun with other settings starts afresh. Tensors go to safetensors, everything else to JSON (no pickle). A
finished run deletes its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["one_cycle", "fingerprint", "Checkpoint", "checkpoint_beside"]


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int,
              pct_start: float) -> torch.optim.lr_scheduler.OneCycleLR:
    """PyTorch's one-cycle schedule (Smith & Topin 2019), for any number of steps.

    ``OneCycleLR`` divides by zero when its warm-up phase ends on step 0, i.e. when ``pct_start * total_steps`` is
    exactly 1 (10 steps at 0.1, 20 at 0.05): there the warm-up is widened to 2 steps (the largest shift is one step).

    Args:
        optimizer: the optimiser whose learning rate (and momentum) it sets.
        max_lr: the peak learning rate.
        total_steps: optimiser steps of the whole run (at least 1).
        pct_start: share of the steps spent warming up.
    """
    total = max(int(total_steps), 1)
    if total > 1 and float(pct_start * total) - 1 == 0:
        pct_start = 2.0 / total
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=pct_start)


def fingerprint(settings: dict[str, Any], *inputs: Path) -> str:
    """A hash of a run's settings (JSON-able) and of its input files' bytes (folders: every file, sorted)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in inputs:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:32]


def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by a reference into ``tensors`` (for JSON)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(f"{prefix}.k{i}", k, tensors), _flatten(f"{prefix}.{i}", v, tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


class Checkpoint:
    """The resumable state of one training run in ``folder``: ``state.safetensors`` + ``state.json``.

    Args:
        folder: where the checkpoint lives (None: checkpoints off).
        key: the run's :func:`fingerprint`; a checkpoint of another key is ignored (and replaced at the next save).
    """

    def __init__(self, folder: Path | None, key: str) -> None:
        self.folder, self.key = folder, key

    def load(self) -> dict[str, Any] | None:
        """The saved state (nested dicts, lists and tensors), or None when there is none for this run."""
        if self.folder is None or not (self.folder / "state.json").is_file():
            return None
        try:
            meta = json.loads((self.folder / "state.json").read_text())
            if meta.get("key") != self.key:
                return None
            return _unflatten(meta["state"], load_file(str(self.folder / "state.safetensors")))
        except Exception:  # a checkpoint cut short by a kill: start afresh rather than fail
            return None

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (a temporary folder renamed over the old one)."""
        if self.folder is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        meta = {"key": self.key, "state": _flatten("s", state, tensors)}
        tmp = self.folder.with_name(f".{self.folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        old = self.folder.with_name(f".{self.folder.name}.old{os.getpid()}")
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        """Delete the checkpoint (the run finished)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_beside(out: Path, settings: dict[str, Any], *inputs: Path, precision: str) -> Checkpoint:
    """The checkpoint of the run that writes ``out``: the folder ``.<name>.checkpoint`` beside it (ignored by git and
    DVC), keyed by the run's settings, its inputs' bytes, the torch version and ``precision``, the arithmetic the
    training loop really uses (say ``"float32"``; the caller names it, so that a run killed under one precision is
    never resumed under another)."""
    key = fingerprint({**settings, "precision": precision, "torch": torch.__version__}, *inputs)
    return Checkpoint(out.with_name(f".{out.name}.checkpoint"), key)
