"""One user image in and its edit out, for ``python -m pipeline.edit``: PNG or DICOM, at the source's own geometry.

Reading: a PNG (or any image Pillow reads) becomes grey levels in [0, 1] (8-bit / 255, 16-bit / 65535, colour
converted to grey); a DICOM goes through the grayscale pipeline of :mod:`pipeline.formats.external` (Modality LUT, VOI LUT or
window, MONOCHROME1 inverted, flipped into the usual chest view by its Patient Orientation) and is scaled to [0, 1]
by its minimum and maximum. The model sees the centre square resized to the data size, as MedMNIST made the data.

Writing: the model's change (edit − source at the data size) is resized up to the centre square and added to the
full-resolution source, so the output has the source's rows and columns, keeps its detail where nothing changed, and
is flipped back to the stored orientation. A DICOM output is a new Secondary Capture object, ``ImageType =
DERIVED\\SECONDARY\\COUNTERFACTUAL``, with new SOP Instance, Series and Study UIDs, the source's pixel spacing and
orientation, a Source Image Sequence pointing at the source instance, and no patient data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.misc import is_dicom
from pydicom.uid import generate_uid

from pipeline.core.cli import PipelineError
from pipeline.formats.dicom import secondary_capture
from pipeline.formats.external import SkipFile, center_square, display_image, normalise, orient, resize, to_uint8

__all__ = ["SourceImage", "read_image", "model_view", "apply_change", "write_png", "derived_dicom"]

GEOMETRY_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio", "PatientOrientation", "ViewPosition",
                     "BodyPartExamined", "ImageLaterality")
"""Attributes copied from a source DICOM so the edit lies on the same grid and in the same view."""


@dataclass
class SourceImage:
    """A user image as grey levels in [0, 1] (float32 H×W, in the usual chest view), and how to store it back.

    Args:
        pixels: grey levels, 0 = black.
        flips: (left-right, up-down) flips applied to reach the usual view (DICOM Patient Orientation).
        dataset: the DICOM header (pixel data dropped), or None for a PNG.
    """

    pixels: np.ndarray
    flips: tuple[bool, bool] = (False, False)
    dataset: Dataset | None = None


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("L") if img.mode not in ("L", "I;16", "I;16B", "I") else img
            arr = np.asarray(img)
    except Exception as exc:  # not an image, truncated file...
        raise PipelineError(f"{path} is neither DICOM nor an image Pillow can read: {exc}") from exc
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16 or arr.max() > 255:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32) / 255.0


def _read_dicom(path: Path) -> SourceImage:
    try:
        ds = pydicom.dcmread(path)
        shown = display_image(ds)
        shown, lr, ud = orient(shown, ds.get("PatientOrientation"))
        pixels = normalise(shown)
    except SkipFile as exc:
        raise PipelineError(f"{path}: cannot edit this DICOM ({exc})") from exc
    except Exception as exc:  # InvalidDicomError, a corrupt element...
        raise PipelineError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    del ds.PixelData
    return SourceImage(pixels, (lr, ud), ds)


def read_image(path: Path) -> SourceImage:
    """Read a PNG (or other Pillow image) or a DICOM file (recognised by its content) for editing."""
    if is_dicom(path):
        return _read_dicom(path)
    return SourceImage(_read_png(path))


def model_view(pixels: np.ndarray, size: int) -> np.ndarray:
    """The centre square of grey levels in [0, 1], resized to ``size`` (antialiased bicubic), as uint8.

    An image already at ``size``×``size`` is only quantised, so a PneumoniaMNIST PNG goes in unchanged.
    """
    square = center_square(pixels)
    return to_uint8(square if square.shape == (size, size) else resize(square, size))


def _resize_signed(change: np.ndarray, side: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(change, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)[0, 0].numpy()


def apply_change(pixels: np.ndarray, source: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """The full-resolution image with the edit's change ``edit − source`` (uint8 at the data size) resized up to its
    centre square and added there; clipped to [0, 1]."""
    h, w = pixels.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    change = (edit.astype(np.float32) - source.astype(np.float32)) / 255.0
    out = pixels.astype(np.float32).copy()
    out[top:top + side, left:left + side] += _resize_signed(change, side)
    return np.clip(out, 0.0, 1.0)


def unflip(image: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """Undo the flips of :func:`pipeline.formats.external.orient` (back to the stored orientation)."""
    lr, ud = flips
    image = image[::-1, :] if ud else image
    return np.ascontiguousarray(image[:, ::-1] if lr else image)


def write_png(path: Path, image: np.ndarray) -> None:
    """Save grey levels in [0, 1] as an 8-bit grey PNG."""
    Image.fromarray(to_uint8(image), mode="L").save(path)


def derived_dicom(source: Dataset, image: np.ndarray, target: str, description: str) -> Dataset:
    """A Secondary Capture dataset holding the edit (grey levels in [0, 1], 16-bit MONOCHROME2) at the source's
    geometry, marked as a derived counterfactual with new UIDs and without patient data.

    Args:
        source: the source DICOM header.
        image: the edit, float H×W in [0, 1], H×W = the source's rows × columns.
        target: clinical status the image was edited to.
        description: provenance (strength, method, guidance, models), written to Derivation Description.
    """
    if image.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"edit of shape {image.shape} does not match the source's {source.Rows}×{source.Columns}")
    pixels = np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)
    ds = secondary_capture(pixels, "COUNTERFACTUAL", generate_uid(),
                           modality=str(source.get("Modality", "OT") or "OT"))
    ds.SeriesDescription = f"COUNTERFACTUAL edit to {target} (latent diffusion)"
    ds.DerivationDescription = description
    ds.ImageComments = f"Counterfactual edit to {target}, not an acquired image of a patient. {description}"
    if "SOPInstanceUID" in source:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        ds.SourceImageSequence = [ref]
    for keyword in GEOMETRY_KEYWORDS:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    return ds
