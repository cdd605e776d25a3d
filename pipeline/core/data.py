"""PneumoniaMNIST access through medmnist's own loader, padding to U-Net-friendly sizes, and the prepared-data format.

The prepared data set is a folder with one ``<split>.npz`` per split (``images``: uint8 N×1×P×P, reflect-padded;
``labels``: int64 N) and ``meta.json`` recording the original size and the padding, so that every later stage can
crop back. Images are normalised at load time to float32 in [0, 1] (``x / 255``).

Data: Yang et al., "MedMNIST v2", Scientific Data 2023 (CC BY 4.0), from Kermany et al., Cell 2018.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.artifacts import load_npz
from pipeline.core.cli import PipelineError

__all__ = ["SIZES", "SPLITS", "CLASSES", "Label", "data_root", "npz_filename", "expected_file", "ensure_npz", "load_medmnist",
           "pad_amounts", "pad_images", "load_prepared", "real_images", "crop", "read_meta", "to_uint8"]

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
CLASSES = ("normal", "pneumonia")
FLAG = "pneumoniamnist"


class Label(str, enum.Enum):
    """A clinical status, as a command-line choice (its index in :data:`CLASSES` is the label)."""

    normal = "normal"
    pneumonia = "pneumonia"


ROOT_ENV = "MEDMNIST_ROOT"


def data_root(root: str) -> Path:
    """The medmnist root: ``root`` if given, else ``$MEDMNIST_ROOT``, else medmnist's default ``~/.medmnist``."""
    if root:
        return Path(root).expanduser()
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    return Path("~/.medmnist").expanduser()


def npz_filename(size: int) -> str:
    """medmnist's file name for PneumoniaMNIST at ``size`` (28 has no suffix)."""
    return f"{FLAG}.npz" if size == 28 else f"{FLAG}_{size}.npz"


def expected_file(size: int) -> tuple[str, str]:
    """(url, md5) that medmnist expects for PneumoniaMNIST at ``size``, from medmnist's own INFO table."""
    from medmnist import INFO

    info = INFO[FLAG]
    suffix = "" if size == 28 else f"_{size}"
    return info[f"url{suffix}"], info[f"MD5{suffix}"]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(root: Path, size: int) -> None:
    """Let medmnist download the file (needs internet)."""
    from medmnist import PneumoniaMNIST

    PneumoniaMNIST(split="train", root=str(root), size=size, download=True)


def ensure_npz(root: Path, size: int) -> Path:
    """Make sure the PneumoniaMNIST file for ``size`` is in ``root`` with the right MD5, downloading it if absent.

    Raises:
        PipelineError: the file is absent and cannot be downloaded, or is present with the wrong MD5 (corrupt or
            truncated). The message names the file, its MD5, its URL and the folder to put it in.
    """
    url, md5 = expected_file(size)
    path = root / npz_filename(size)
    where = f"put {path.name} (MD5 {md5}, from {url}) into {root} (or set data.root / ${ROOT_ENV})"
    if not path.exists():
        try:
            root.mkdir(parents=True, exist_ok=True)
            _download(root, size)
        except Exception as exc:  # no network, DNS failure, HTTP error, ...
            _discard_partial(path, md5)
            raise PipelineError(f"{path} is missing and could not be downloaded ({type(exc).__name__}); {where}") \
                from exc
    actual = _md5(path)
    if actual != md5:
        raise PipelineError(f"{path} is corrupt or truncated: MD5 {actual}, expected {md5}; delete it and {where}")
    return path


def _discard_partial(path: Path, md5: str) -> None:
    if path.exists() and _md5(path) != md5:
        path.unlink()


def load_medmnist(root: Path, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split through medmnist's loader: uint8 images N×H×W and int64 labels N (0 normal, 1 pneumonia)."""
    from medmnist import PneumoniaMNIST

    try:
        ds = PneumoniaMNIST(split=split, root=str(root), size=size, download=False)
    except Exception as exc:  # a file with the right MD5 should always load; anything else is a broken install
        raise PipelineError(f"medmnist could not read {root / npz_filename(size)}: {exc}") from exc
    return np.asarray(ds.imgs, dtype=np.uint8), np.asarray(ds.labels, dtype=np.int64).reshape(-1)


def pad_amounts(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) padding that brings ``size`` up to the next multiple of ``multiple``."""
    total = (-size) % multiple
    return total // 2, total - total // 2


def pad_images(images: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad N×H×W images (square) to N×1×P×P, P a multiple of ``multiple``.

    Returns: the padded images and the padding (before, after)."""
    before, after = pad_amounts(images.shape[-1], multiple)
    padded = np.pad(images, ((0, 0), (before, after), (before, after)), mode="reflect")
    return padded[:, None], (before, after)


def read_meta(prepared: Path) -> dict[str, Any]:
    """The ``meta.json`` of a prepared data folder."""
    path = prepared / "meta.json"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the prepare stage first (dvc repro prepare, or dvc pull)")
    return json.loads(path.read_text())


def load_prepared(prepared: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a prepared split: float32 images N×1×P×P in [0, 1] and int64 labels N."""
    z = load_npz(prepared / f"{split}.npz", ("images", "labels"), "prepare")
    return torch.from_numpy(z["images"]).float().div_(255.0), torch.from_numpy(z["labels"]).long()


def real_images(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpadded images of a prepared split as uint8 N×H×W (0 = black, at the data size) and int64 labels N."""
    x, y = load_prepared(prepared, split)
    return to_uint8(crop(x[:, 0], read_meta(prepared)["pad"])), y.numpy()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Quantise float images in [0, 1] to uint8 (as a PNG would store them); values outside are clipped."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def crop(images: torch.Tensor | np.ndarray, pad: tuple[int, int] | list[int]) -> Any:
    """Undo :func:`pad_images` on the last two axes."""
    before, after = pad
    h, w = images.shape[-2:]
    return images[..., before:h - after, before:w - after]
