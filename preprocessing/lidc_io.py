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
    "consistent_slices",
    "decode_hu",
    "find_patient_dirs",
    "read_series_headers",
    "relative_posix",
    "slice_by_z",
    "walk_files",
    "write_nifti",
]

PATIENT_DIR_PATTERN = re.compile(r"^LIDC-IDRI-\d{4}$")
"""TCIA names each patient folder after its PatientID."""

Z_TOLERANCE_MM = 0.01
"""How close a file's ImagePositionPatient z must be to the DB's slice z to be that slice (DS strings carry
more digits than this, and LIDC's thinnest slice spacing is far larger)."""

ORIENTATION_TOLERANCE = 1e-4
"""Largest difference between two ImageOrientationPatient components that still counts as the same orientation."""

PIXEL_SPACING_TOLERANCE_MM = 1e-3
"""Largest difference between two PixelSpacing values (mm) that still counts as the same spacing."""

OBLIQUE_TOLERANCE_DEG = 1.0
"""A series whose slice normal is further than this from the scanner z axis is oblique and is not cropped."""

NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "REG", "SEG", "RTSTRUCT", "DOC", "PLAN"})
"""Modalities of objects that have no pixel data by design, so a header that ends the file is not a cut."""

_HEADER_TAGS = [
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceLocation",
    "SliceThickness",
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
        relative_path: the path relative to the DICOM root, with ``/`` separators (what outputs record).
        sop_instance_uid: SOPInstanceUID, or ``""`` when the header has none.
        slice_thickness: SliceThickness in mm, or None when absent.
    """

    path: str
    z: float
    instance_number: int
    slice_location: float | None
    geometry: SliceGeometry
    relative_path: str = ""
    sop_instance_uid: str = ""
    slice_thickness: float | None = None

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient as read: the row cosine, then the column cosine."""
        return [float(v) for v in (*self.geometry.row_cosine, *self.geometry.column_cosine)]

    @property
    def pixel_spacing(self) -> list[float]:
        """PixelSpacing as read: ``[row spacing, column spacing]`` in mm."""
        return [float(self.geometry.row_spacing), float(self.geometry.column_spacing)]


@dataclass
class SeriesFiles:
    """All readable DICOM files of one (study, series) pair found under a patient folder.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: Modality of the first file seen.
        slices: the files that can be placed as image slices.
        incomplete: files of the series whose header lacks a tag needed to place them, as file skips whose
            reason says whether the header was cut short (the file ends inside it, no pixel data follows) or
            the object is complete but not an image slice. Every one is listed when the series is in use;
            of another series only the cut-short ones are (the others are counted as that series' files).
    """

    study_uid: str
    series_uid: str
    modality: str
    slices: list[DicomSlice] = field(default_factory=list)
    incomplete: list[Skip] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        """Every file of the series (placed or not), relative to the DICOM root."""
        return [s.relative_path for s in self.slices] + [s.path for s in self.incomplete if s.path]


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


def walk_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Every file below ``folder``, in a fixed order (folders and names sorted; symlinked folders not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def relative_posix(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` with ``/`` separators, as every output records file paths."""
    return Path(os.path.relpath(path, root)).as_posix()


def _float_list(value: Any, count: int, tag: str) -> np.ndarray:
    array = np.asarray([float(v) for v in value], dtype=np.float64)
    if array.shape != (count,):
        raise ValueError(f"{tag} has {array.size} values, expected {count}")
    return array


def _read_header(path: Path) -> tuple[pydicom.Dataset, bool]:
    """The header (no pixel data), and whether it runs to the end of the file.

    pydicom stops in front of the pixel data element; a header that reaches the end of the file has no pixel
    data after it, which for an image means the file was cut short (pydicom returns what it could parse).
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            # Some archives drop the 128-byte preamble; accept those only if they carry the tags we need.
            handle.seek(0)
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
            if "SeriesInstanceUID" not in ds or "ImagePositionPatient" not in ds:
                raise InvalidDicomError("no DICOM preamble and no image series tags") from None
        return ds, handle.tell() >= size


def _orientation(value: Any) -> np.ndarray:
    orientation = _float_list(value, 6, "ImageOrientationPatient")
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(float(row @ column)) > 1e-3:
        raise ValueError(f"ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")
    return orientation


def read_series_headers(
    patient_dir: Path, dicom_root: Path, patient_id: str
) -> tuple[dict[tuple[str, str], SeriesFiles], list[Skip], list[str]]:
    """Read the header of every file under a patient folder and group image files by study and series.

    Files that are not DICOM, whose header cannot be parsed or that carry no Study/Series UID are returned as
    file-level skips; files of a series that lack the tags needed to place the slice (or whose geometry tags
    are malformed) go to that series' ``incomplete``. Nothing raises. Every file found ends up in exactly one
    place: a series' ``slices``, a series' ``incomplete``, or the returned skips.

    Args:
        patient_dir: the patient folder; any nesting below it is accepted.
        dicom_root: the ``--dicom-root``, to report paths relative to it.
        patient_id: used in skip records.

    Returns:
        ``({(study_uid, series_uid): SeriesFiles}, skips, found)``: series keyed and files ordered
        deterministically, and every file found, relative to ``dicom_root``, in walk order.
    """
    series: dict[tuple[str, str], SeriesFiles] = {}
    skips: list[Skip] = []
    found: list[str] = []
    for path in walk_files(patient_dir):
        relative = relative_posix(path, dicom_root)
        found.append(relative)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds, header_ends_file = _read_header(path)
        except InvalidDicomError:
            skips.append(Skip("file", "not a DICOM file", patient_id, path=relative))
            continue
        except Exception as err:  # pydicom raises many types on a truncated or corrupt header
            skips.append(Skip("file", "unreadable DICOM header", patient_id, path=relative, detail=_short(err)))
            continue
        cut_note = "the header ends the file: no pixel data follows (cut short?)" if header_ends_file else None
        study = str(ds.get("StudyInstanceUID", "")).strip()
        series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not study or not series_uid:
            skips.append(
                Skip("file", "DICOM file without Study/Series Instance UID", patient_id, path=relative, detail=cut_note)
            )
            continue
        key = (study, series_uid)
        modality = str(ds.get("Modality", "")).strip()
        entry = series.setdefault(key, SeriesFiles(study, series_uid, modality))
        missing = [tag for tag in ("ImagePositionPatient", "PixelSpacing", "Rows", "Columns") if tag not in ds]
        if missing:
            # pydicom returns a partial dataset for a header cut short, so a missing tag is how truncation
            # shows; scouts, X-rays and SR objects lack these tags too, but they are complete files.
            cut = header_ends_file and modality.upper() not in NON_IMAGE_MODALITIES
            reason = "missing geometry: DICOM header cut short" if cut else "missing geometry: not an image slice"
            detail = f"missing {', '.join(missing)}" + (f"; {cut_note}" if cut else "")
            entry.incomplete.append(Skip("file", reason, patient_id, series_uid, relative, detail=detail))
            continue
        try:
            position = _float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient")
            orientation = _orientation(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
            spacing = _float_list(ds.PixelSpacing, 2, "PixelSpacing")
            rows, columns = int(ds.Rows), int(ds.Columns)
            instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else 2**31
            location = float(ds.SliceLocation) if ds.get("SliceLocation") not in (None, "") else None
            thickness = float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None
        except Exception as err:
            entry.incomplete.append(
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
        entry.slices.append(
            DicomSlice(
                str(path),
                float(position[2]),
                instance,
                location,
                geometry,
                relative_path=relative,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")).strip(),
                slice_thickness=thickness,
            )
        )
    return dict(sorted(series.items())), skips, found


def _same_geometry(a: DicomSlice, b: DicomSlice) -> tuple[bool, bool]:
    """(same orientation, same pixel spacing) within the tolerances."""
    same_orientation = max(abs(x - y) for x, y in zip(a.orientation, b.orientation)) <= ORIENTATION_TOLERANCE
    same_spacing = max(abs(x - y) for x, y in zip(a.pixel_spacing, b.pixel_spacing)) <= PIXEL_SPACING_TOLERANCE_MM
    return same_orientation, same_spacing


def _format_values(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def consistent_slices(
    files: Iterable[DicomSlice], patient_id: str, series_uid: str
) -> tuple[list[DicomSlice], list[Skip], Skip | None]:
    """Keep the slices of a series that share its orientation and pixel spacing; refuse oblique series.

    Crops are cut on one in-plane grid per series, the one the annotations were drawn on. Slices are grouped
    by ImageOrientationPatient (within :data:`ORIENTATION_TOLERANCE`) and PixelSpacing (within
    :data:`PIXEL_SPACING_TOLERANCE_MM`). The group holding more than half of the slices is the series'
    geometry and its slices are kept; every other slice is dropped with a file skip naming its values and the
    series'. Without such a majority, or when the series' slice normal is more than
    :data:`OBLIQUE_TOLERANCE_DEG` from the scanner z axis (an oblique or tilted acquisition, whose slice
    positions are not one z each), the whole series is refused.

    Args:
        files: the placed slices of one series.
        patient_id: for skip records.
        series_uid: for skip records.

    Returns:
        ``(kept slices, file skips for dropped slices, scan skip or None)``; with a scan skip nothing is kept.
    """
    ordered = sorted(files, key=lambda s: (s.relative_path, s.path))
    groups: list[list[DicomSlice]] = []
    for item in ordered:
        for group in groups:
            if all(_same_geometry(group[0], item)):
                group.append(item)
                break
        else:
            groups.append([item])
    if not groups:
        return [], [], None
    majority = max(groups, key=len)  # the first of equal groups; only a strict majority is used below
    if 2 * len(majority) <= len(ordered):
        detail = "; ".join(
            f"{len(g)} slice(s) with orientation {_format_values(g[0].orientation)}, "
            f"PixelSpacing {_format_values(g[0].pixel_spacing)}"
            for g in groups
        )
        return (
            [],
            [],
            Skip(
                "scan",
                "slices disagree on orientation or PixelSpacing, none in the majority; not cropped",
                patient_id,
                series_uid,
                detail=detail[:300],
            ),
        )
    reference = majority[0]
    normal = reference.geometry.normal
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / float(np.linalg.norm(normal))))))
    if tilt > OBLIQUE_TOLERANCE_DEG:
        return (
            [],
            [],
            Skip(
                "scan",
                "oblique series: slice normal is not along z; not cropped",
                patient_id,
                series_uid,
                detail=f"orientation {_format_values(reference.orientation)}, normal {tilt:.2f} deg from z",
            ),
        )
    kept_ids = {id(item) for item in majority}
    skips: list[Skip] = []
    for item in ordered:
        if id(item) in kept_ids:
            continue
        same_orientation, _ = _same_geometry(reference, item)
        if not same_orientation:
            reason = "other orientation than the rest of the series"
            detail = (
                f"ImageOrientationPatient {_format_values(item.orientation)}, "
                f"series {_format_values(reference.orientation)}"
            )
        else:
            reason = "other PixelSpacing than the rest of the series"
            detail = (
                f"PixelSpacing {_format_values(item.pixel_spacing)}, series {_format_values(reference.pixel_spacing)}"
            )
        skips.append(Skip("file", reason, patient_id, series_uid, item.relative_path, item.z, detail=detail))
    return [item for item in ordered if id(item) in kept_ids], skips, None


def slice_by_z(
    files: Iterable[DicomSlice], patient_id: str, series_uid: str, slice_location_filter: bool
) -> tuple[list[DicomSlice], list[Skip]]:
    """Choose one file per z, optionally dropping files whose |SliceLocation| != |ImagePositionPatient z|.

    Duplicate z positions keep the lowest InstanceNumber, as pylidc's loader does, then the first path in
    sorted order; every other file at that z is a file skip naming the one kept.

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
                        item.relative_path,
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
                        item.relative_path,
                        item.z,
                        detail=f"SliceLocation={item.slice_location}",
                    )
                )
                continue
        kept.append(item)
    kept.sort(key=lambda s: (s.z, s.instance_number, s.relative_path))
    unique: list[DicomSlice] = []
    for item in kept:
        if unique and abs(unique[-1].z - item.z) <= Z_TOLERANCE_MM:
            first = unique[-1]
            if item.sop_instance_uid and item.sop_instance_uid == first.sop_instance_uid:
                why = "a copy: same SOPInstanceUID"
            elif item.instance_number == first.instance_number:
                why = "same InstanceNumber; first path in sorted order kept"
            else:
                why = "lower InstanceNumber kept"
            skips.append(
                Skip(
                    "file",
                    "duplicate slice position: another file of the series has this z",
                    patient_id,
                    series_uid,
                    item.relative_path,
                    item.z,
                    detail=f"kept {first.relative_path} ({why})",
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
