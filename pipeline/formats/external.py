"""External chest X-rays in the VinDr-PCXR layout: DICOM reading, the PneumoniaMNIST preprocessing, label mapping.

Layout (as VinDr-PCXR is published on PhysioNet, and as any hospital can arrange its own DICOMs)::

    root/train/<image_id>.dicom   root/image_labels_train.csv
    root/test/<image_id>.dicom    root/image_labels_test.csv

Each CSV has an ``image_id`` column and one 0/1 column per finding, including ``No finding`` and ``Pneumonia``; other
columns (e.g. a reader id) are ignored. Several rows for one image (several readers) are merged: a finding counts
when any row marks it.

One DICOM becomes one uint8 image the way PneumoniaMNIST was made (0 = black, bone bright):

1. pixels through the DICOM grayscale pipeline with pydicom: Modality LUT or Rescale Slope/Intercept, then the VOI LUT
   (preferred) or the window (Window Center/Width, with its VOI LUT Function), then inversion of MONOCHROME1
   (Presentation LUT Shape is not applied again: for MONOCHROME1 radiographs DICOM makes it ``INVERSE``, the same
   inversion). Any bit depth and sign; compressed transfer syntaxes through pydicom's decoders (RLE natively, JPEG,
   JPEG-LS and JPEG 2000 through GDCM / pylibjpeg).
2. orientation: a Patient Orientation of ``R`` along the rows (or ``H`` down the columns) means the image is mirrored
   (or upside down) against the viewing convention of chest radiographs (the patient's left on the viewer's right,
   head up), and is flipped back; images without Patient Orientation are kept as stored.
3. intensities scaled to [0, 1] by the image's own minimum and maximum after step 1 (the usual recipe for VinDr
   DICOMs); a constant image is skipped.
4. the centre square with the side of the short edge, resized to the data size: MedMNIST made PneumoniaMNIST by
   "center-crop[ping] the images with a window size of length of the short edge and resiz[ing] them" (MedMNIST+
   notes, ``on_medmnist_plus.md``, and ``medmnist.INFO``). MedMNIST does not name its interpolation; we use
   antialiased bicubic (``torch.nn.functional.interpolate(..., antialias=True)``, the same filter as Pillow's
   bicubic ``resize``), because a 2000-pixel radiograph shrunk 70× without a low-pass filter aliases badly.
5. quantised to uint8 (``round(255 x)``), as PneumoniaMNIST stores its pixels.

A file that cannot be used is skipped with a reason (:data:`SKIP_REASONS`), never raised: one bad file must not stop
an evaluation of thousands.

Pham et al., "PediCXR: An open, large-scale chest radiograph dataset for interpretation of common thoracic diseases
in children" (VinDr-PCXR), Scientific Data 2023; PhysioNet, https://physionet.org/content/vindr-pcxr/.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

__all__ = ["DICOM_SUFFIXES", "SKIP_REASONS", "check_chest_radiograph", "LABEL_REASONS", "COUNT_KEYS", "SkipFile", "ExternalSet",
           "display_image", "orient", "normalise", "center_square", "resize", "to_uint8", "preprocess", "read_dicom",
           "read_label_table", "classify_findings", "label_images", "missing_label_names", "load_external",
           "how_to_get_vindr"]

DICOM_SUFFIXES = (".dicom", ".dcm")
SKIP_REASONS = ("unreadable", "not_image", "not_radiograph", "not_chest", "not_frontal", "unsupported",
                "decode_failed", "blank")
"""Why a DICOM file was not used: not a DICOM file or a corrupt header; no pixel data (a report, a presentation
state...); a Modality other than a projection radiograph (CR, DX, DR: a CT, MR, NM, US or secondary-capture image);
a Body Part Examined that is present and names no chest; a View Position that is present and is not frontal (PA or
AP: PneumoniaMNIST, and so the models, are frontal chest radiographs); colour or multi-frame; pixel data that cannot
be decoded (corrupt, or no decoder installed for its transfer syntax); a constant image. A reason is one line and
never quotes a header value (a file's header may hold anything, patient data included)."""
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
CHEST_WORDS = ("CHEST", "THORAX", "TORAX", "THORACIC", "LUNG", "PECHO")
FRONTAL_VIEWS = ("PA", "AP")
LABEL_REASONS = ("no_label", "excluded_label", "conflicting_label", "over_max")
"""Why a readable file was not used: no row in the labels CSV; neither normal nor pneumonia (another finding only, or
no finding marked at all); marked both normal and pneumonia, or normal together with another finding; beyond
``max_images``."""
COUNT_KEYS = ("n_files", "n_images", "n_normal", "n_pneumonia",
              *(f"skipped_{r}" for r in LABEL_REASONS + SKIP_REASONS),
              "n_label_rows", "labels_without_file", "ignored_other_files", "missing_split_folders",
              "missing_label_csvs", "bad_label_csvs", "label_names_not_in_csv", "flipped_left_right",
              "flipped_up_down")
"""Every count the loader reports. Each DICOM-named file lands in exactly one of ``n_images`` and ``skipped_*``, so
``n_files = n_images + sum(skipped_*)``."""


class SkipFile(Exception):
    """A file that is not used, with its reason (one of :data:`SKIP_REASONS`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ExternalSet:
    """Preprocessed external images: uint8 N×S×S (0 = black), labels (0 normal, 1 pneumonia) and the counts of
    :data:`COUNT_KEYS`."""

    images: np.ndarray
    labels: np.ndarray
    counts: Counter = field(default_factory=Counter)


# --- one DICOM -> one image ----------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as upper-case text ('' when absent or unreadable)."""
    try:
        return str(ds.get(keyword, "") or "").strip().upper()
    except Exception:  # noqa: BLE001 -- a malformed value counts as absent
        return ""


def check_chest_radiograph(ds: Dataset) -> None:
    """Raise :class:`SkipFile` unless the header allows a frontal projection radiograph of a chest: Modality (when
    present) CR, DX or DR; Body Part Examined (when present) naming the chest; View Position (when present) PA or AP.

    Raises:
        SkipFile: ``not_radiograph``, ``not_chest`` or ``not_frontal``; the detail names the tag, never its value.
    """
    modality, body, view = _text(ds, "Modality"), _text(ds, "BodyPartExamined"), _text(ds, "ViewPosition")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise SkipFile("not_radiograph", "Modality is not CR, DX or DR")
    if body and not any(word in body for word in CHEST_WORDS):
        raise SkipFile("not_chest", "Body Part Examined is not the chest")
    if view and view.split()[0] not in FRONTAL_VIEWS:
        raise SkipFile("not_frontal", "View Position is not PA or AP")


def _count(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword, 1) or 1)
    except Exception as exc:  # noqa: BLE001 -- e.g. '1A': the reason names the tag, not the value
        raise SkipFile("unsupported", f"malformed {keyword}") from exc


def _check_pixels(ds: Dataset) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise SkipFile("not_image", "no pixel data")


def _check_grayscale(ds: Dataset) -> None:
    _check_pixels(ds)
    photometric = _text(ds, "PhotometricInterpretation")
    if _count(ds, "SamplesPerPixel") != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SkipFile("unsupported", "not a grayscale image")
    if _count(ds, "NumberOfFrames") != 1:
        raise SkipFile("unsupported", "multi-frame")


def display_image(ds: Dataset) -> np.ndarray:
    """The image as a radiologist sees it, before scaling: higher = brighter (float64 H×W).

    Modality LUT (or rescale slope/intercept), VOI LUT (preferred) or window, then MONOCHROME1 inverted.

    Raises:
        SkipFile: no pixel data, not a single grayscale frame, or pixel data that cannot be decoded.
    """
    _check_grayscale(ds)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # corrupt stream, truncated data, no decoder plugin for the transfer syntax...
        raise SkipFile("decode_failed", type(exc).__name__) from exc
    if raw.ndim != 2:
        raise SkipFile("unsupported", f"a {raw.ndim}-d pixel array")
    try:
        shown = apply_voi_lut(apply_modality_lut(raw, ds), ds, prefer_lut=True).astype(np.float64)
    except Exception as exc:  # malformed LUT descriptor, non-numeric window...
        raise SkipFile("decode_failed", f"grayscale transform: {type(exc).__name__}") from exc
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        shown = shown.max() + shown.min() - shown  # same range, reversed: minimum = white
    return shown


def orient(image: np.ndarray, orientation: Sequence[str] | None) -> tuple[np.ndarray, bool, bool]:
    """Flip an image into the viewing convention of chest radiographs (patient's left on the viewer's right, head up).

    Args:
        image: H×W.
        orientation: DICOM Patient Orientation (row direction, column direction), e.g. ``["L", "F"]``; None or
            anything else than R/L and H/F leaves the image as it is.

    Returns:
        The image, and whether it was flipped left-right and up-down.
    """
    if not orientation or len(orientation) != 2:
        return image, False, False
    row, col = (str(v).strip().upper()[:1] for v in orientation)
    lr, ud = row == "R", col == "H"
    if lr:
        image = image[:, ::-1]
    if ud:
        image = image[::-1, :]
    return image, lr, ud


def normalise(image: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the image's minimum and maximum (float32).

    Raises:
        SkipFile: a constant image (or one with non-finite values), which has no contrast to scale.
    """
    lo, hi = float(np.min(image)), float(np.max(image))
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise SkipFile("blank", "constant or non-finite image")
    return ((image - lo) / (hi - lo)).astype(np.float32)


def center_square(image: np.ndarray) -> np.ndarray:
    """The centred square of side min(H, W) (MedMNIST's crop for PneumoniaMNIST)."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[..., top:top + side, left:left + side]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bicubic resize of a float H×W image to ``size``×``size``, clipped to [0, 1] (bicubic overshoots).

    With ``antialias=True`` the bicubic kernel is widened by the reduction factor when shrinking, as in Pillow's
    ``Image.resize``, so detail finer than the output grid is averaged instead of aliased.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y[0, 0].clamp_(0.0, 1.0).numpy()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Quantise [0, 1] to uint8 as PneumoniaMNIST stores its pixels (0 = black)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def preprocess(shown: np.ndarray, size: int) -> np.ndarray:
    """A displayed image (higher = brighter) -> uint8 ``size``×``size``: min-max to [0, 1], centre square, resize."""
    return to_uint8(resize(center_square(normalise(shown)), size))


def read_dicom(path: Path, size: int) -> tuple[np.ndarray, tuple[bool, bool]]:
    """Read one DICOM file into a preprocessed uint8 ``size``×``size`` image (see the module docstring).

    Returns:
        The image and (flipped left-right, flipped up-down).

    Raises:
        SkipFile: the file cannot be used; ``reason`` says why (one of :data:`SKIP_REASONS`).
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # InvalidDicomError, EOFError, OSError, a corrupt element...
        raise SkipFile("unreadable", type(exc).__name__) from exc
    _check_pixels(ds)  # a report is not an image, before it is not a radiograph
    check_chest_radiograph(ds)
    shown = display_image(ds)
    try:
        orientation = ds.get("PatientOrientation")
    except Exception:  # noqa: BLE001 -- a malformed value is only a missing orientation
        orientation = None
    shown, lr, ud = orient(shown, orientation)
    return preprocess(shown, size), (lr, ud)


# --- labels ----------------------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def read_label_table(csv: Path) -> pd.DataFrame:
    """The 0/1 finding columns of a VinDr-PCXR labels CSV, one row per ``image_id`` (rows of one image merged by max).

    Finding columns are the numeric columns whose values are all 0 or 1 (empty cells count as 0); others, such as a
    reader id, are dropped. Column names keep their spelling, stripped of surrounding spaces.

    Raises:
        ValueError: the file is not a CSV with an ``image_id`` column.
    """
    table = pd.read_csv(csv)
    table.columns = [str(c).strip() for c in table.columns]
    ids = [c for c in table.columns if _key(c) == "image_id"]
    if not ids:
        raise ValueError(f"{csv.name} has no image_id column (columns: {', '.join(table.columns[:8])}...)")
    table = table.rename(columns={ids[0]: "image_id"})
    table["image_id"] = table["image_id"].astype(str).str.strip()
    findings = [c for c in table.columns if c != "image_id" and _is_binary(table[c])]
    return table[["image_id", *findings]].fillna(0).astype({c: int for c in findings}).groupby("image_id").max()


def _is_binary(column: pd.Series) -> bool:
    values = pd.to_numeric(column, errors="coerce")
    return bool(values.notna().sum() == column.notna().sum() and values.dropna().isin([0, 1]).all())


def classify_findings(findings: dict[str, int], normal_label: str, pneumonia_labels: Iterable[str]) -> str:
    """Map one image's 0/1 findings to ``"normal"``, ``"pneumonia"`` or a skip reason of :data:`LABEL_REASONS`.

    Rules (column names compared without case and extra spaces):
    pneumonia when any of ``pneumonia_labels`` is 1 (other findings may be present too, as in PneumoniaMNIST's
    pneumonia class) and ``normal_label`` is not; normal when ``normal_label`` is 1 and no other finding is;
    ``conflicting_label`` when ``normal_label`` is 1 together with any finding; ``excluded_label`` otherwise
    (other findings only, or nothing marked).
    """
    marked = {_key(k) for k, v in findings.items() if v == 1}
    pneumonia = marked & {_key(k) for k in pneumonia_labels}
    normal = _key(normal_label) in marked
    if normal and len(marked) > 1:
        return "conflicting_label"
    if normal:
        return "normal"
    return "pneumonia" if pneumonia else "excluded_label"


def label_images(table: pd.DataFrame, normal_label: str, pneumonia_labels: Sequence[str]) -> dict[str, str]:
    """``image_id`` -> class name or label skip reason, by :func:`classify_findings`, for every row of ``table``."""
    return {image_id: classify_findings(row, normal_label, pneumonia_labels)
            for image_id, row in table.to_dict(orient="index").items()}


def missing_label_names(table: pd.DataFrame, names: Iterable[str]) -> list[str]:
    """The configured label names that are not finding columns of ``table`` (a misspelling finds no image)."""
    have = {_key(c) for c in table.columns}
    return [n for n in names if _key(n) not in have]


# --- a whole folder ----------------------------------------------------------------------------------------------


def _split_files(folder: Path, counts: Counter) -> dict[str, Path]:
    """``image_id`` -> path of the DICOM-named files of one split folder (others are counted and ignored)."""
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() in DICOM_SUFFIXES:
            files[path.stem] = path
        else:
            counts["ignored_other_files"] += 1
    counts["n_files"] += len(files)
    return files


def _split_labels(root: Path, split: str, normal_label: str, pneumonia_labels: Sequence[str], counts: Counter,
                  log: list[str]) -> dict[str, str]:
    """``image_id`` -> class or label reason from ``image_labels_{split}.csv``; empty when absent or unreadable."""
    csv = root / f"image_labels_{split}.csv"
    if not csv.is_file():
        counts["missing_label_csvs"] += 1
        log.append(f"{csv} not found: every image of {split}/ counts as skipped_no_label")
        return {}
    try:
        table = read_label_table(csv)
    except Exception as exc:  # noqa: BLE001 -- not a CSV, no image_id column, undecodable bytes...
        counts["bad_label_csvs"] += 1
        log.append(f"{csv} cannot be used ({type(exc).__name__}: {exc}): its images count as skipped_no_label")
        return {}
    missing = missing_label_names(table, [normal_label, *pneumonia_labels])
    if missing:
        counts["label_names_not_in_csv"] += len(missing)
        log.append(f"{csv.name} has no column {', '.join(repr(m) for m in missing)}; "
                   f"its finding columns are {', '.join(map(repr, table.columns))}")
    counts["n_label_rows"] += len(table)
    return label_images(table, normal_label, pneumonia_labels)


def _candidates(root: Path, splits: Sequence[str], normal_label: str, pneumonia_labels: Sequence[str],
                counts: Counter, log: list[str]) -> list[tuple[Path, int]]:
    """Labelled DICOM files (path, class index) in split order then ``image_id`` order; the rest is counted."""
    out: list[tuple[Path, int]] = []
    for split in splits:
        folder = root / split
        labels = _split_labels(root, split, normal_label, pneumonia_labels, counts, log)
        if not folder.is_dir():
            counts["missing_split_folders"] += 1
            counts["labels_without_file"] += len(labels)
            log.append(f"{folder} not found: split {split!r} skipped")
            continue
        files = _split_files(folder, counts)
        counts["labels_without_file"] += len(set(labels) - set(files))
        for image_id, path in files.items():
            label = labels.get(image_id, "no_label")
            if label in ("normal", "pneumonia"):
                out.append((path, 0 if label == "normal" else 1))
            else:
                counts[f"skipped_{label}"] += 1
    return out


def load_external(root: Path, splits: Sequence[str], size: int, normal_label: str = "No finding",
                  pneumonia_labels: Sequence[str] = ("Pneumonia",), max_images: int | None = None,
                  log: list[str] | None = None) -> ExternalSet:
    """Read every labelled normal / pneumonia DICOM of ``root`` (VinDr-PCXR layout) into preprocessed images.

    Args:
        root: the folder holding ``{split}/`` and ``image_labels_{split}.csv``.
        splits: which splits to read, e.g. ``["test"]``.
        size: output image size (the data size, e.g. 28).
        normal_label: the finding column meaning "normal".
        pneumonia_labels: finding columns meaning "pneumonia".
        max_images: read at most this many labelled images (the first in split, then ``image_id``, order);
            None reads all.
        log: if given, one line per skipped file or problem is appended (file names and reasons only).

    Returns:
        The images, labels and counts (every key of :data:`COUNT_KEYS`). Never raises for a bad file.
    """
    counts: Counter = Counter({k: 0 for k in COUNT_KEYS})
    log = [] if log is None else log
    todo = _candidates(root, splits, normal_label, pneumonia_labels, counts, log)
    if max_images is not None and len(todo) > max_images:
        counts["skipped_over_max"] += len(todo) - max_images
        todo = todo[:max_images]
    images, labels = [], []
    for path, label in todo:
        try:
            image, (lr, ud) = read_dicom(path, size)
        except SkipFile as exc:
            counts[f"skipped_{exc.reason}"] += 1
            log.append(f"skipped {path.parent.name}/{path.name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 -- anything unforeseen in one file: count it, never stop the run
            counts["skipped_decode_failed"] += 1
            log.append(f"skipped {path.parent.name}/{path.name}: decode_failed: {type(exc).__name__}")
            continue
        counts["flipped_left_right"] += lr
        counts["flipped_up_down"] += ud
        images.append(image)
        labels.append(label)
    arr = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    lab = np.asarray(labels, dtype=np.int64)
    counts.update({"n_images": len(lab), "n_normal": int((lab == 0).sum()), "n_pneumonia": int((lab == 1).sum())})
    return ExternalSet(arr, lab, counts)


def how_to_get_vindr(root: str) -> str:
    """What to tell a user whose external folder is absent."""
    where = f"'{root}' does not exist" if root else "external.root is empty"
    return (f"no external data ({where}); the external evaluation is skipped. To run it, get VinDr-PCXR from "
            "PhysioNet (credentialed access, https://physionet.org/content/vindr-pcxr/), unpack it so that the "
            "folder holds test/<image_id>.dicom and image_labels_test.csv (train/ likewise), and run "
            "`dvc exp run -S external.root=/path/to/vindr-pcxr` (any folder of DICOMs laid out the same way works)")
