"""DICOM export of synthetic images: Secondary Capture objects with fresh UIDs, no patient data, marked as derived
and synthetic so they can never be mistaken for a patient's radiograph."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

__all__ = ["secondary_capture", "synthetic_dicom", "write_synthetic_dicom"]


def secondary_capture(pixels: np.ndarray, kind: str, series_uid: str, number: int = 1,
                      modality: str = "OT") -> Dataset:
    """The skeleton every image this project writes shares: a Secondary Capture with fresh SOP Instance and Study
    UIDs, ``ImageType = DERIVED\\SECONDARY\\<kind>``, no patient data (patient name and ID are ``kind``), and the
    grayscale pixel module of ``pixels``.

    Args:
        pixels: uint8 or uint16 H×W, stored as MONOCHROME2 with 8 or 16 bits.
        kind: what the image is, e.g. ``SYNTHETIC`` or ``COUNTERFACTUAL``.
        series_uid: SeriesInstanceUID (shared by the images of one series).
        number: InstanceNumber.
        modality: Modality (``OT`` for images that were never acquired).
    """
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim != 2:
        raise ValueError(f"a DICOM image must be uint8 or uint16 H×W, got {pixels.dtype} {pixels.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    now = dt.datetime.now(dt.timezone.utc)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid
    ds.Modality, ds.ConversionType = modality, "WSD"  # workstation: made here, not acquired
    ds.ImageType = ["DERIVED", "SECONDARY", kind]
    ds.PatientName, ds.PatientID = kind, kind
    ds.PatientIdentityRemoved, ds.BurnedInAnnotation = "YES", "NO"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceNumber = number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = 8 * pixels.dtype.itemsize
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def synthetic_dicom(image: np.ndarray, label: str, description: str, series_uid: str, number: int) -> Dataset:
    """A Secondary Capture dataset holding one synthetic uint8 grayscale image.

    Args:
        image: uint8 H×W.
        label: clinical status the image was generated for (``normal`` / ``pneumonia``).
        description: provenance written to ImageComments (model, seed, guidance...).
        series_uid: SeriesInstanceUID shared by a cohort.
        number: InstanceNumber.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"synthetic_dicom wants a uint8 H×W image, got {image.dtype} {image.shape}")
    ds = secondary_capture(image, "SYNTHETIC", series_uid, number)
    ds.SeriesDescription = f"SYNTHETIC {label} chest X-ray (latent diffusion)"
    ds.ImageComments = f"Synthetic image, not a patient. {description}"
    return ds


def write_synthetic_dicom(folder: Path, images: np.ndarray, labels: list[str], descriptions: list[str]) -> list[Path]:
    """Write one ``<index>.dcm`` per image into ``folder`` (one series); return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for i, (image, label, desc) in enumerate(zip(images, labels, descriptions)):
        path = folder / f"{i:06d}.dcm"
        synthetic_dicom(image, label, desc, series, i + 1).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
