"""One DICOM file of a CT series: its header without pixel data, whether its pixel data is whole, its HU.

Headers are read without pixel data to place each slice (:func:`read_file_header`); pixels are decoded only
for the slices that are used (:func:`decode_hu`). Every file ends up in exactly one place: a slice of its
series, a file of its series that is no usable slice, or a file of no series, each with a :class:`Skip` that
says why, so ``found = used + ignored`` can be accounted for. A folder of files becomes series in
:mod:`car_med.ct.series`.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from car_med.ct.geometry import SliceGeometry

__all__ = [
    "NON_IMAGE_MODALITIES",
    "OBLIQUE_TOLERANCE_DEG",
    "ORIENTATION_TOLERANCE",
    "PIXEL_SPACING_TOLERANCE_MM",
    "HEADER_CUT_SHORT",
    "PIXELS_CUT_SHORT",
    "Z_TOLERANCE_MM",
    "DicomSlice",
    "FileHeader",
    "Skip",
    "decode_hu",
    "nearest_slice",
    "pixel_data_problem",
    "read_file_header",
    "relative_posix",
    "walk_files",
]

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
    "SamplesPerPixel",
    "BitsAllocated",
    "NumberOfFrames",
    "PatientID",
]

PIXELS_CUT_SHORT = "pixel data cut short"
"""The reason a file whose header is whole but whose pixel data ends early is ignored."""

HEADER_CUT_SHORT = "missing geometry: DICOM header cut short"
"""The reason a file that ends inside its header (some geometry tags never came) is ignored."""

_PIXEL_DATA_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_ITEM, _SEQUENCE_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF


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


class FileHeader(NamedTuple):
    """Where one file's header places it: a slice of a series, a file of a series that is no usable slice, or
    a file of no series.

    Attributes:
        study_uid: StudyInstanceUID; ``""`` for a file of no series.
        series_uid: SeriesInstanceUID; ``""`` for a file of no series.
        modality: Modality, ``""`` when absent.
        dicom_patient_id: PatientID, ``""`` when absent.
        slice: the file placed as an image slice, or None.
        skip: why the file is no slice (None for a slice). With ``series_uid`` set it is a file of that series
            whose header (:data:`HEADER_CUT_SHORT`) or pixel data (:data:`PIXELS_CUT_SHORT`, with the slice's z)
            is cut short, or a complete object that is not an image slice; without, the file is not DICOM, its
            header cannot be parsed, or it carries no Study/Series UID.
    """

    study_uid: str
    series_uid: str
    modality: str
    dicom_patient_id: str
    slice: DicomSlice | None
    skip: Skip | None


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


def pixel_data_problem(handle: BinaryIO, ds: pydicom.Dataset, file_size: int) -> str | None:
    """Whether the pixel data element at ``handle``'s position is whole, judged without decoding it.

    ``handle`` stands where ``pydicom.dcmread(..., stop_before_pixels=True)`` left it: at the pixel data
    element's tag, or at the end of the file. Native pixel data must hold ``Rows x Columns x SamplesPerPixel x
    NumberOfFrames`` samples of ``BitsAllocated`` bits and fit in the file. Encapsulated (compressed) pixel
    data must be a run of items that each fit in the file, closed by the sequence delimiter. pydicom's
    ``generate_fragments`` reads every fragment's bytes and takes a missing delimiter for the end of the data;
    this reads only the 8-byte item headers and seeks past the values, so a 244k-file archive is checked at
    the cost of its headers.

    Returns:
        ``None`` for whole pixel data, else what is wrong, in a few words.
    """
    start = handle.tell()
    if start >= file_size:
        return "the header ends the file: no pixel data follows"
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    implicit = syntax is None or syntax.is_implicit_VR
    order = "<" if syntax is None or syntax.is_little_endian else ">"

    def read(count: int) -> bytes | None:
        chunk = handle.read(count)
        return chunk if len(chunk) == count else None

    head = read(8)
    if head is None:
        return f"the file ends {file_size - start} bytes into the pixel data element's header"
    tag = struct.unpack(f"{order}HH", head[:4])
    if tag not in _PIXEL_DATA_TAGS:
        return None  # the header ended on another element: pydicom parsed what this file holds
    if implicit:
        (length,) = struct.unpack(f"{order}I", head[4:])
    else:
        rest = read(4)
        if rest is None:
            return "the file ends inside the pixel data element's header"
        (length,) = struct.unpack(f"{order}I", rest)
    if length != _UNDEFINED_LENGTH:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        samples *= int(ds.get("SamplesPerPixel", 1) or 1) * frames
        expected = (samples * bits + 7) // 8
        available = file_size - handle.tell()
        if length < expected:
            return f"the pixel data element holds {length} bytes, the header's image size needs {expected}"
        if length > available:
            return f"the pixel data element declares {length} bytes, the file holds {available} after its header"
        return None
    items = 0
    while True:
        item = read(8)
        if item is None:
            return f"encapsulated pixel data: the file ends after {items} item(s), before the sequence delimiter"
        item_tag, item_length = struct.unpack(f"{order}HH", item[:4]), struct.unpack(f"{order}I", item[4:])[0]
        if item_tag == _SEQUENCE_DELIMITER:
            return None
        if item_tag != _ITEM:
            return f"encapsulated pixel data: item {items} has tag ({item_tag[0]:04X},{item_tag[1]:04X})"
        if item_length > file_size - handle.tell():
            return f"encapsulated pixel data: item {items} declares {item_length} bytes, the file ends before"
        handle.seek(item_length, os.SEEK_CUR)
        items += 1


def _read_header(path: Path) -> tuple[pydicom.Dataset, bool, str | None]:
    """The header (no pixel data), whether it runs to the end of the file, and what is wrong with the pixels.

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
        header_ends_file = handle.tell() >= size
        return ds, header_ends_file, pixel_data_problem(handle, ds, size)


def _orientation(value: Any) -> np.ndarray:
    orientation = _float_list(value, 6, "ImageOrientationPatient")
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(float(row @ column)) > 1e-3:
        raise ValueError(f"ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")
    return orientation


def read_file_header(path: Path, relative_path: str, patient_id: str) -> FileHeader:
    """Read one file's header (no pixel data) and place it: a slice, a file of a series that is no slice, or a
    file of no series (:class:`FileHeader`). Nothing raises.

    A file of a series that lacks the tags needed to place the slice (or whose geometry tags are malformed) is
    no slice, and so is an image whose pixel data is cut short (:func:`pixel_data_problem`, checked for every
    file, not only the ones later decoded).

    Args:
        path: the file.
        relative_path: the path reported in skips and slices (relative to the DICOM root).
        patient_id: used in skip records.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds, header_ends_file, pixel_problem = _read_header(path)
    except InvalidDicomError:
        return _no_series(Skip("file", "not a DICOM file", patient_id, path=relative_path))
    except Exception as err:  # pydicom raises many types on a truncated or corrupt header
        skip = Skip("file", "unreadable DICOM header", patient_id, path=relative_path, detail=_short(err))
        return _no_series(skip)
    cut_note = "the header ends the file: no pixel data follows (cut short?)" if header_ends_file else None
    study_uid = str(ds.get("StudyInstanceUID", "")).strip()
    series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
    if not study_uid or not series_uid:
        reason = "DICOM file without Study/Series Instance UID"
        return _no_series(Skip("file", reason, patient_id, path=relative_path, detail=cut_note))
    modality = str(ds.get("Modality", "")).strip()
    file_skip = partial(Skip, "file", patient_id=patient_id, series_uid=series_uid, path=relative_path)
    missing = [tag for tag in ("ImagePositionPatient", "PixelSpacing", "Rows", "Columns") if tag not in ds]
    placed: DicomSlice | Skip
    if missing:
        # pydicom returns a partial dataset for a header cut short, so a missing tag is how truncation
        # shows; scouts, X-rays and SR objects lack these tags too, but they are complete files.
        cut = header_ends_file and modality.upper() not in NON_IMAGE_MODALITIES
        reason = HEADER_CUT_SHORT if cut else "missing geometry: not an image slice"
        placed = file_skip(reason=reason, detail=f"missing {', '.join(missing)}" + (f"; {cut_note}" if cut else ""))
    else:
        placed = _placed_slice(
            ds, path=path, relative_path=relative_path, pixel_problem=pixel_problem, file_skip=file_skip
        )
    dicom_patient_id = str(ds.get("PatientID", "")).strip()
    if isinstance(placed, Skip):
        return FileHeader(study_uid, series_uid, modality, dicom_patient_id, None, placed)
    return FileHeader(study_uid, series_uid, modality, dicom_patient_id, placed, None)


def _no_series(skip: Skip) -> FileHeader:
    return FileHeader("", "", "", "", None, skip)


def _placed_slice(
    ds: pydicom.Dataset, path: Path, relative_path: str, pixel_problem: str | None, file_skip: Callable[..., Skip]
) -> DicomSlice | Skip:
    """The slice a header with every geometry tag describes, or the skip of a malformed tag or cut pixel data."""
    try:
        position = _float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient")
        orientation = _orientation(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
        spacing = _float_list(ds.PixelSpacing, 2, "PixelSpacing")
        rows, columns = int(ds.Rows), int(ds.Columns)
        instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else 2**31
        location = float(ds.SliceLocation) if ds.get("SliceLocation") not in (None, "") else None
        thickness = float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None
    except Exception as err:
        return file_skip(reason="DICOM header with malformed geometry tags", detail=_short(err))
    if pixel_problem is not None:
        # the slice would be placed, and counted as used, until some later full read fails on it
        return file_skip(reason=PIXELS_CUT_SHORT, slice_z=float(position[2]), detail=pixel_problem)
    geometry = SliceGeometry(
        position=position,
        row_cosine=orientation[:3],
        column_cosine=orientation[3:],
        row_spacing=float(spacing[0]),
        column_spacing=float(spacing[1]),
        slice_spacing=0.0,
        shape=(rows, columns),
    )
    return DicomSlice(
        str(path),
        float(position[2]),
        instance,
        location,
        geometry,
        relative_path=relative_path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")).strip(),
        slice_thickness=thickness,
    )


def nearest_slice(slices: Sequence[DicomSlice], z: float) -> DicomSlice | None:
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
