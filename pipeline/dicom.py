"""DICOM export of synthetic images: Secondary Capture objects with fresh UIDs, no patient data, marked as derived
and synthetic so they can never be mistaken for a patient's radiograph."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

__all__ = ["synthetic_dicom", "write_synthetic_dicom"]


def synthetic_dicom(image: np.ndarray, label: str, description: str, series_uid: str, number: int) -> Dataset:
    """A Secondary Capture dataset holding one uint8 grayscale image.

    Args:
        image: uint8 H×W.
        label: clinical status the image was generated for (``normal`` / ``pneumonia``).
        description: provenance written to ImageComments (model, seed, guidance...).
        series_uid: SeriesInstanceUID shared by a cohort.
        number: InstanceNumber.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"synthetic_dicom wants a uint8 H×W image, got {image.dtype} {image.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    now = dt.datetime.now(dt.timezone.utc)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid
    ds.Modality, ds.ConversionType = "OT", "WSD"  # other / workstation: synthetic, not acquired
    ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
    ds.PatientName, ds.PatientID = "SYNTHETIC", "SYNTHETIC"
    ds.PatientIdentityRemoved = "YES"
    ds.BurnedInAnnotation = "NO"
    ds.SeriesDescription = f"SYNTHETIC {label} chest X-ray (latent diffusion)"
    ds.ImageComments = f"Synthetic image, not a patient. {description}"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceNumber = number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(image).tobytes()
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
