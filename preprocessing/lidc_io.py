"""DICOM discovery and decoding, NIfTI writing and atomic file output for the LIDC preprocessing.

DICOM headers are read without pixel data to map each slice position to its file; pixels are decoded only
for the slices that become crops (most of a scan is never cropped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from preprocessing.lidc_geometry import SliceGeometry

__all__ = [
    "PATIENT_DIR_PATTERN",
    "DicomSlice",
    "SeriesFiles",
    "Skip",
    "atomic_write_bytes",
    "atomic_write_json",
    "decode_hu",
    "find_patient_dirs",
    "read_series_headers",
    "slice_by_z",
    "write_nifti",
]

PATIENT_DIR_PATTERN = re.compile(r"^LIDC-IDRI-\d{4}$")
"""TCIA names each patient folder after its PatientID."""

Z_TOLERANCE_MM = 0.01
"""How close a file's ImagePositionPatient z must be to the DB's slice z to be that slice (DS strings carry
more digits than this, and LIDC's thinnest slice spacing is far larger)."""

_HEADER_TAGS = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceLocation",
    "Rows",
    "Columns",
]


@dataclass(frozen=True)
class Skip:
    """One thing the run could not use, and why; collected into ``summary.json``.

    Attributes:
        level: ``"patient"``, ``"file"``, ``"scan"``, ``"slice"`` or ``"nodule"``.
        reason: a short, stable, human-readable reason.
        patient_id: the patient folder or DB patient the item belongs to.
        series_uid: the series, where known.
        path: the file, relative to the DICOM root, where relevant.
        slice_z: the DB slice z in mm, for slice skips.
        nodule_id: the nodule index within its scan, for slice and nodule skips.
        detail: extra text (an exception message, counts), kept short.
    """

    level: str
    reason: str
    patient_id: str
    series_uid: str | None = None
    path: str | None = None
    slice_z: float | None = None
    nodule_id: int | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass(frozen=True)
class DicomSlice:
    """Header facts of one DICOM file, enough to place it and to decode it later.

    Attributes:
        path: absolute path of the file.
        z: ImagePositionPatient[2] in mm.
        instance_number: InstanceNumber, or a large number when absent (so a numbered duplicate wins).
        slice_location: SliceLocation in mm, or None when absent.
        geometry: where the slice lies (slice_spacing is filled in later from the DB).
    """

    path: str
    z: float
    instance_number: int
    slice_location: float | None
    geometry: SliceGeometry


@dataclass
class SeriesFiles:
    """All readable DICOM files of one (study, series) pair found under a patient folder.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: Modality of the first file seen.
        slices: the files that can be placed as image slices.
        incomplete: files of the series whose header lacks a tag needed to place them (a truncated header,
            or a non-image object); reported only if the series is one the run uses.
    """

    study_uid: str
    series_uid: str
    modality: str
    slices: list[DicomSlice] = field(default_factory=list)
    incomplete: list[Skip] = field(default_factory=list)


def find_patient_dirs(dicom_root: str | os.PathLike) -> dict[str, Path]:
    """Map patient ids to their folders under ``dicom_root``.

    A patient folder is named ``LIDC-IDRI-dddd``. It may sit directly under the root (TCIA's layout) or one
    level deeper (the NBIA downloader's ``LIDC-IDRI/LIDC-IDRI-dddd``).

    Raises:
        FileNotFoundError: the root does not exist.
        ValueError: a patient id appears in two folders.
    """
    root = Path(dicom_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--dicom-root {str(root)!r} is not a directory.")
    found: dict[str, Path] = {}
    candidates = [p for p in root.iterdir() if p.is_dir()]
    for child in sorted(candidates):
        grandchildren = [child] if PATIENT_DIR_PATTERN.match(child.name) else sorted(child.iterdir())
        for folder in grandchildren:
            if folder.is_dir() and PATIENT_DIR_PATTERN.match(folder.name):
                if folder.name in found:
                    raise ValueError(f"patient {folder.name} has two folders: {found[folder.name]} and {folder}.")
                found[folder.name] = folder
    return dict(sorted(found.items()))


def _walk_files(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _float_list(value: Any, count: int, tag: str) -> np.ndarray:
    array = np.asarray([float(v) for v in value], dtype=np.float64)
    if array.shape != (count,):
        raise ValueError(f"{tag} has {array.size} values, expected {count}")
    return array


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        # Some archives drop the 128-byte preamble; accept those only if they carry the tags we need.
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        if "SeriesInstanceUID" not in ds or "ImagePositionPatient" not in ds:
            raise InvalidDicomError("no DICOM preamble and no image series tags") from None
        return ds


def read_series_headers(
    patient_dir: Path, dicom_root: Path, patient_id: str
) -> tuple[dict[tuple[str, str], SeriesFiles], list[Skip]]:
    """Read the header of every file under a patient folder and group image files by study and series.

    Files that are not DICOM, whose header cannot be parsed, or that lack the tags needed to place the slice,
    are returned as file-level skips instead of raising.

    Args:
        patient_dir: the patient folder; any nesting below it is accepted.
        dicom_root: the ``--dicom-root``, to report paths relative to it.
        patient_id: used in skip records.

    Returns:
        ``({(study_uid, series_uid): SeriesFiles}, skips)``, series keyed and files ordered deterministically.
    """
    series: dict[tuple[str, str], SeriesFiles] = {}
    skips: list[Skip] = []
    for path in _walk_files(patient_dir):
        relative = os.path.relpath(path, dicom_root)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = _read_header(path)
        except InvalidDicomError:
            skips.append(Skip("file", "not a DICOM file", patient_id, path=relative))
            continue
        except Exception as err:  # pydicom raises many types on a truncated or corrupt header
            skips.append(Skip("file", "unreadable DICOM header", patient_id, path=relative, detail=_short(err)))
            continue
        study = str(ds.get("StudyInstanceUID", "")).strip()
        series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not study or not series_uid:
            skips.append(Skip("file", "DICOM file without Study/Series Instance UID", patient_id, path=relative))
            continue
        key = (study, series_uid)
        entry = series.setdefault(key, SeriesFiles(study, series_uid, str(ds.get("Modality", "")).strip()))
        missing = [tag for tag in ("ImagePositionPatient", "PixelSpacing", "Rows", "Columns") if tag not in ds]
        if missing:
            # pydicom returns a partial dataset for a header cut short, so a missing tag is how truncation
            # shows; it is also how scouts and SR objects look, hence reported only for series in use.
            entry.incomplete.append(
                Skip(
                    "file",
                    "DICOM header incomplete (truncated file or not an image)",
                    patient_id,
                    series_uid,
                    relative,
                    detail=f"missing {', '.join(missing)}",
                )
            )
            continue
        try:
            position = _float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient")
            orientation = _float_list(
                ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), 6, "ImageOrientationPatient"
            )
            spacing = _float_list(ds.PixelSpacing, 2, "PixelSpacing")
            rows, columns = int(ds.Rows), int(ds.Columns)
            instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else 2**31
            location = float(ds.SliceLocation) if ds.get("SliceLocation") not in (None, "") else None
        except Exception as err:
            skips.append(
                Skip(
                    "file",
                    "DICOM header with malformed geometry tags",
                    patient_id,
                    series_uid,
                    relative,
                    detail=_short(err),
                )
            )
            continue
        geometry = SliceGeometry(
            position=position,
            row_cosine=orientation[:3],
            column_cosine=orientation[3:],
            row_spacing=float(spacing[0]),
            column_spacing=float(spacing[1]),
            slice_spacing=0.0,
            shape=(rows, columns),
        )
        entry.slices.append(DicomSlice(str(path), float(position[2]), instance, location, geometry))
    return dict(sorted(series.items())), skips


def slice_by_z(
    files: Iterable[DicomSlice], dicom_root: Path, patient_id: str, series_uid: str, slice_location_filter: bool
) -> tuple[list[DicomSlice], list[Skip]]:
    """Choose one file per z, optionally dropping files whose |SliceLocation| != |ImagePositionPatient z|.

    Duplicate z positions keep the lowest InstanceNumber, as pylidc's loader does.

    Returns:
        ``(slices sorted by z, file-level skips)``.
    """
    skips: list[Skip] = []
    kept: list[DicomSlice] = []
    for item in files:
        if slice_location_filter:
            if item.slice_location is None:
                skips.append(
                    Skip(
                        "file",
                        "SliceLocation filter: no SliceLocation",
                        patient_id,
                        series_uid,
                        os.path.relpath(item.path, dicom_root),
                        item.z,
                    )
                )
                continue
            if abs(abs(item.slice_location) - abs(item.z)) > Z_TOLERANCE_MM:
                skips.append(
                    Skip(
                        "file",
                        "SliceLocation filter: |SliceLocation| != |ImagePositionPatient z|",
                        patient_id,
                        series_uid,
                        os.path.relpath(item.path, dicom_root),
                        item.z,
                        detail=f"SliceLocation={item.slice_location}",
                    )
                )
                continue
        kept.append(item)
    kept.sort(key=lambda s: (s.z, s.instance_number, s.path))
    unique: list[DicomSlice] = []
    for item in kept:
        if unique and abs(unique[-1].z - item.z) <= Z_TOLERANCE_MM:
            skips.append(
                Skip(
                    "file",
                    "duplicate slice position; kept the lower InstanceNumber",
                    patient_id,
                    series_uid,
                    os.path.relpath(item.path, dicom_root),
                    item.z,
                    detail=f"kept {os.path.relpath(unique[-1].path, dicom_root)}",
                )
            )
            continue
        unique.append(item)
    return unique, skips


def nearest_slice(slices: list[DicomSlice], z: float) -> DicomSlice | None:
    """The slice at ``z`` within :data:`Z_TOLERANCE_MM`, or None when the series has no file there."""
    if not slices:
        return None
    zs = np.fromiter((s.z for s in slices), dtype=np.float64, count=len(slices))
    index = int(np.abs(zs - z).argmin())
    return slices[index] if abs(zs[index] - z) <= Z_TOLERANCE_MM else None


def decode_hu(item: DicomSlice) -> np.ndarray:
    """Decode one slice to Hounsfield units (float32, ``[row, column]``).

    Raises:
        ValueError: the pixel data is missing, truncated or has an unexpected shape.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(item.path)
        if "PixelData" not in ds:
            raise ValueError("no PixelData element")
        pixels = ds.pixel_array
    if pixels.shape != item.geometry.shape:
        raise ValueError(f"pixel array shape {pixels.shape}, header says {item.geometry.shape}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _short(err: BaseException, limit: int = 200) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a ``[row, column]`` crop as a NIfTI of shape ``(columns, rows, 1)`` with a scanner-frame affine.

    Both qform and sform carry the affine with code 1 (scanner), so any viewer picks the same frame.
    """
    data = np.ascontiguousarray(array.T[:, :, np.newaxis])
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that readers see either the old content or the full new content, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_bytes(payload: Any) -> bytes:
    """Canonical JSON: sorted keys, fixed indentation, trailing newline, so equal content gives equal bytes."""
    return (json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write canonical JSON atomically (see :func:`json_bytes`)."""
    atomic_write_bytes(path, json_bytes(payload))


def replace_dir(staging: Path, final: Path) -> None:
    """Move a finished staging folder into place, replacing a stale folder of the same name."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
