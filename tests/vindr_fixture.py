"""A synthetic external data set in the VinDr-PCXR layout, written by the tests (the real one is credentialed).

Every readable file stores the same kind of picture, a smooth asymmetric phantom (bright blob top left, ramps to the
right and down, a white band at the top and a black band at the bottom), each in another DICOM encoding: MONOCHROME1
and MONOCHROME2, a VOI LUT (with a decoy window that must lose), a window only with pixels beyond it, 8/12/16 bits,
signed pixels with rescale slope/intercept, odd and non-square sizes, JPEG 2000 and RLE compression, a mirrored image
with Patient Orientation ``R\\F``. Decoding it right gives back the phantom; every mistake (no window, no LUT, no
inversion, no rescale, no flip) gives a visibly different image. Beside them: a truncated file, a file that is not
DICOM, a DICOM without pixels, a colour DICOM, a constant image, label rows that exclude, conflict or miss, a label
row without a file and a stray text file. :func:`write_vindr_fixture` returns what the loader must count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

FINDINGS = ["No finding", "Bronchitis", "Pneumonia", "Bronchiolitis", "Other disease"]


@dataclass
class VindrFixture:
    """Where the fixture is, what the loader must count (the keys of ``pipeline.external.COUNT_KEYS``), and the
    phantom each readable file shows, keyed by ``<split>/<file name>`` (higher = brighter, in [0, 1])."""

    root: Path
    counts: dict[str, int]
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)


def phantom(h: int, w: int) -> np.ndarray:
    """A smooth, asymmetric picture in [0, 1] with exact 0 and 1: white band at the top, black band at the bottom."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = y / (h - 1), x / (w - 1)
    d = 0.35 * x + 0.25 * y + 0.6 * np.exp(-((x - 0.3) ** 2 + (y - 0.35) ** 2) / 0.02)
    d = 0.05 + 0.9 * (d - d.min()) / (d.max() - d.min())
    band = max(2, h // 20)
    d[:band], d[-band:] = 1.0, 0.0
    return d


def _base(rows: int, cols: int, photometric: str = "MONOCHROME2", sop: str = DigitalXRayImageStorageForPresentation
          ) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "PHANTOM", "PHANTOM"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = rows, cols
    return ds


def _pixels(ds: Dataset, stored: np.ndarray, bits_stored: int, signed: bool = False) -> Dataset:
    allocated = 8 if bits_stored <= 8 else 16
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(allocated, signed)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = np.ascontiguousarray(np.round(stored).astype(dtype)).tobytes()
    return ds


def _window(ds: Dataset, center: float, width: float) -> tuple[float, float]:
    """Set a linear window; return its (lowest, highest) input value, as DICOM defines them (C.11.2.1.2.1)."""
    ds.WindowCenter, ds.WindowWidth = center, width
    return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2


def _windowed(d: np.ndarray, lo: float, hi: float, inverted: bool = False) -> np.ndarray:
    """Stored values that the window [lo, hi] maps to ``d`` (or 1 - d), with the bands pushed beyond the window."""
    v = 1.0 - d if inverted else d
    s = lo + v * (hi - lo)
    span = hi - lo
    s[v == 1.0], s[v == 0.0] = hi + 0.3 * span, lo - 0.3 * span  # clipped by the window, never by min-max
    return s


def mono2_window_16bit(d: np.ndarray) -> Dataset:
    ds = _base(*d.shape)
    lo, hi = _window(ds, 20000, 10000)
    return _pixels(ds, _windowed(d, lo, hi), 16)


def mono1_window_16bit(d: np.ndarray) -> Dataset:
    ds = _base(*d.shape, "MONOCHROME1")
    ds.PresentationLUTShape = "INVERSE"  # what DX requires with MONOCHROME1: the same inversion, not a second one
    lo, hi = _window(ds, 30000, 20001)
    return _pixels(ds, _windowed(d, lo, hi, inverted=True), 16)


def mono2_voi_lut_12bit(d: np.ndarray) -> Dataset:
    ds = _base(*d.shape)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first stored value, bits
    item.add_new(0x00283006, "US", np.round(65535 * np.sqrt(np.arange(4096) / 4095)).astype(int).tolist())
    ds.VOILUTSequence = [item]
    _window(ds, 100, 50)  # a decoy: with a VOI LUT present, the LUT is the one to apply
    return _pixels(ds, 4095 * d ** 2, 12)


def mono2_rescale_signed(d: np.ndarray) -> Dataset:
    ds = _base(*d.shape)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, 1024, "US"
    lo, hi = _window(ds, 0, 2000)  # in rescaled units: v = 2 s + 1024, so s is negative
    return _pixels(ds, (_windowed(d, lo, hi) - 1024) / 2, 16, signed=True)


def mono2_8bit_plain(d: np.ndarray) -> Dataset:
    return _pixels(_base(*d.shape), 255 * d, 8)


def mono1_12bit_plain(d: np.ndarray) -> Dataset:
    return _pixels(_base(*d.shape, "MONOCHROME1"), 4095 * (1 - d), 12)


def mono2_mirrored(d: np.ndarray) -> Dataset:
    ds = _pixels(_base(*d.shape), 255 * d[:, ::-1], 8)
    ds.PatientOrientation = ["R", "F"]  # stored mirrored: the patient's right on the viewer's right
    return ds


def j2k_lossless(d: np.ndarray) -> Dataset:
    ds = mono2_window_16bit(d)
    ds.compress(JPEG2000Lossless)
    return ds


def rle_lossless(d: np.ndarray) -> Dataset:
    ds = mono1_12bit_plain(d)
    ds.compress(RLELossless)
    return ds


READABLE: list[tuple[str, tuple[int, int], Callable[[np.ndarray], Dataset]]] = [
    ("mono2_window_16bit", (257, 193), mono2_window_16bit),
    ("mono1_window_16bit", (191, 263), mono1_window_16bit),
    ("mono2_voi_lut_12bit", (240, 240), mono2_voi_lut_12bit),
    ("mono2_rescale_signed", (129, 131), mono2_rescale_signed),
    ("mono2_8bit_plain", (97, 150), mono2_8bit_plain),
    ("mono1_12bit_plain", (301, 255), mono1_12bit_plain),
    ("mono2_mirrored", (120, 111), mono2_mirrored),
    ("j2k_lossless", (149, 161), j2k_lossless),
    ("rle_lossless", (133, 128), rle_lossless),
]


def _save(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def _write_bad_files(folder: Path) -> dict[str, str]:
    """Files that must be skipped; name -> the skip reason the loader must give."""
    good = mono2_8bit_plain(phantom(64, 64))
    _save(good, folder / "truncated.dicom")
    data = (folder / "truncated.dicom").read_bytes()
    (folder / "truncated.dicom").write_bytes(data[:len(data) - 1500])  # cut inside the pixel data
    (folder / "not_dicom.dicom").write_bytes(np.random.default_rng(0).bytes(3000))
    report = _base(1, 1, sop=BasicTextSRStorage)
    for k in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(report, k)
    report.Modality = "SR"
    _save(report, folder / "report.dicom")
    rgb = _base(32, 32, "RGB")
    rgb.SamplesPerPixel, rgb.PlanarConfiguration = 3, 0
    _save(_pixels(rgb, np.zeros((32, 32, 3)), 8), folder / "colour.dicom")
    _save(_pixels(_base(40, 40), np.full((40, 40), 77), 8), folder / "constant.dicom")
    for name, tag, value in (("ct_slice", "Modality", "CT"), ("skull", "BodyPartExamined", "SKULL"),
                             ("lateral", "ViewPosition", "LL")):  # fine pixels, but not a frontal chest radiograph
        ds = mono2_8bit_plain(phantom(50, 50))
        setattr(ds, tag, value)
        _save(ds, folder / f"{name}.dicom")
    return {"truncated": "decode_failed", "not_dicom": "unreadable", "report": "not_image", "colour": "unsupported",
            "constant": "blank", "ct_slice": "not_radiograph", "skull": "not_chest", "lateral": "not_frontal"}


def _row(image_id: str, marked: list[str], reader: str = "R1") -> dict[str, object]:
    return {"image_id": image_id, "rad_ID": reader, **{f: int(f in marked) for f in FINDINGS}}


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    pd.DataFrame(rows).to_csv(path, index=False)


def write_vindr_fixture(root: Path) -> VindrFixture:
    """Write the fixture into ``root`` (``train/`` and ``test/`` with their labels CSVs) and return what to expect
    from reading splits ``["train", "test"]`` with the default labels (``No finding`` / ``Pneumonia``)."""
    (root / "test").mkdir(parents=True)
    (root / "train").mkdir()
    fx = VindrFixture(root, {})
    rows: list[dict[str, object]] = []
    for i, (name, shape, encode) in enumerate(READABLE):
        d = phantom(*shape)
        suffix = ".dcm" if name == "mono2_8bit_plain" else ".dicom"  # both suffixes are DICOM names
        _save(encode(d), root / "test" / f"{name}{suffix}")
        fx.expected[f"test/{name}{suffix}"] = d
        fx.labels[f"test/{name}{suffix}"] = i % 2
        rows.append(_row(name, ["Pneumonia", "Bronchitis"] if i % 2 else ["No finding"]))
    bad = _write_bad_files(root / "test")
    rows += [_row(name, ["Pneumonia"] if i % 2 else ["No finding"]) for i, name in enumerate(bad)]
    for name, marked in (("other_finding", ["Bronchiolitis"]), ("conflict", ["No finding", "Pneumonia"]),
                         ("nothing_marked", [])):
        _save(mono2_8bit_plain(phantom(50, 50)), root / "test" / f"{name}.dicom")
        rows.append(_row(name, marked))
    _save(mono2_8bit_plain(phantom(50, 50)), root / "test" / "unlisted.dicom")  # no row in the CSV
    rows.append(_row("row_without_file", ["No finding"]))
    (root / "test" / "README.txt").write_text("not an image\n")
    _write_csv(root / "image_labels_test.csv", rows)
    train_rows = []
    for i, reader_marks in enumerate(([["No finding"], ["No finding"]], [["Pneumonia"], ["No finding"]])):
        _save(mono2_8bit_plain(phantom(70, 90)), root / "train" / f"train{i}.dicom")
        train_rows += [_row(f"train{i}", marks, f"R{j}") for j, marks in enumerate(reader_marks)]
    _write_csv(root / "image_labels_train.csv", train_rows)
    fx.expected["train/train0.dicom"], fx.labels["train/train0.dicom"] = phantom(70, 90), 0
    n_read = len(READABLE) + 1
    fx.counts = {
        "n_files": len(READABLE) + len(bad) + 4 + 2, "n_images": n_read,
        "n_normal": sum(v == 0 for v in fx.labels.values()), "n_pneumonia": sum(v == 1 for v in fx.labels.values()),
        "skipped_no_label": 1, "skipped_excluded_label": 2, "skipped_conflicting_label": 2, "skipped_over_max": 0,
        **{f"skipped_{r}": list(bad.values()).count(r) for r in set(bad.values())},
        "n_label_rows": len(READABLE) + len(bad) + 3 + 1 + 2, "labels_without_file": 1, "ignored_other_files": 1,
        "missing_split_folders": 0, "missing_label_csvs": 0, "bad_label_csvs": 0, "label_names_not_in_csv": 0,
        "flipped_left_right": 1, "flipped_up_down": 0,
    }
    return fx
