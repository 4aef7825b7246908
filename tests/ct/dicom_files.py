"""Small CT slices written with pydicom for the car_med.ct tests: every header value is set here, so a test
can compute what the library should read without the library's help."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

STUDY_UID, SERIES_UID = "1.2.3", "1.2.3.4"
RESCALE_INTERCEPT = -1024
ORIGIN = (-5.0, -8.0)  # ImagePositionPatient x, y of every slice


def stored_pixels(z: float, rows: int = 16, columns: int = 16) -> np.ndarray:
    """The stored values of the slice at ``z``: distinct per pixel and per slice (HU = stored - 1024)."""
    grid = np.arange(rows * columns, dtype=np.int64).reshape(rows, columns) * 7
    return ((grid + round(z * 10)) % 4096).astype(np.uint16)


def write_slice(
    path: Path,
    *,
    z: float = 0.0,
    syntax: str = ExplicitVRLittleEndian,
    rows: int = 16,
    columns: int = 16,
    series_uid: str = SERIES_UID,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (0.7, 0.7),
    instance_number: int | None = None,
    patient_id: str = "PAT-1",
) -> Path:
    """One CT slice at ``z`` (ImagePositionPatient ``(*ORIGIN, z)``, SliceLocation ``z``), RescaleIntercept -1024."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, series_uid
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number if instance_number is not None else int(round(z * 10)) + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [*ORIGIN, z], list(orientation)
    ds.SliceLocation = z
    ds.PixelSpacing = list(pixel_spacing)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = RESCALE_INTERCEPT, 1
    pixels = stored_pixels(z, rows, columns)
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return path


def write_series(folder: Path, zs: Sequence[float], **kwargs) -> list[Path]:
    """One file per z, named by z (``z0025.dcm`` for 2.5 mm), in the order given."""
    return [write_slice(folder / f"z{int(round(z * 10)):04d}.dcm", z=z, **kwargs) for z in zs]
