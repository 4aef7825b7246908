"""One way to open a folder of DICOM files as CT series: :func:`open_series`.

Prediction (:mod:`car_med.predict`), the volume reader (:func:`car_med.ct.volume.read_ct_series`) and LIDC
preprocessing all read a DICOM folder through :func:`open_series`, so a series means the same slices to each
of them. It walks the folder once and reads every header once (:func:`car_med.ct.dicom.read_file_header`),
groups the files by (StudyInstanceUID, SeriesInstanceUID), and reduces each series in four steps, each
leaving a :class:`~car_med.ct.dicom.Skip` for every file it drops:

1. files that are no usable slice (header or pixel data cut short, geometry missing or malformed);
2. slices of another orientation or pixel spacing than the series' majority, or the whole series when it has
   no majority or is oblique (:func:`consistent_slices`);
3. optionally, slices whose SliceLocation disagrees with their z (Kohl et al. 2018);
4. all but one file per z position, and the rest sorted by z (:func:`slice_by_z`).

A reader that needs every slice (a volume, a prediction) takes :meth:`SeriesFolder.whole_series`, which
refuses a series that lost a file in steps 1-2, naming the file; preprocessing records the skips instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from car_med.ct.dicom import (
    OBLIQUE_TOLERANCE_DEG,
    ORIENTATION_TOLERANCE,
    PIXEL_SPACING_TOLERANCE_MM,
    Z_TOLERANCE_MM,
    DicomSlice,
    Skip,
    read_file_header,
    relative_posix,
    walk_files,
)

__all__ = [
    "DicomSeries",
    "SeriesFolder",
    "SeriesReport",
    "consistent_slices",
    "open_series",
    "slice_by_z",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesReport:
    """What :func:`open_series` left out of one series, and why: one :class:`~car_med.ct.dicom.Skip` per file
    (relative path, reason, detail), in the order of the steps.

    Attributes:
        incomplete: files of the series that are no usable slice: the header was cut short
            (:data:`~car_med.ct.dicom.HEADER_CUT_SHORT`), the pixel data was cut short
            (:data:`~car_med.ct.dicom.PIXELS_CUT_SHORT`, with the slice's z), a geometry tag is malformed, or
            the object is complete but not an image slice.
        other_geometry: slices of another orientation or PixelSpacing than the series' majority.
        refusal: the scan skip when the whole series is refused (no majority geometry, or oblique); then the
            series keeps no slice.
        location_filtered: slices dropped by the SliceLocation filter (only when it was asked for).
        duplicates: files at a z position that another file of the series holds, each naming the one kept.
    """

    incomplete: tuple[Skip, ...] = ()
    other_geometry: tuple[Skip, ...] = ()
    refusal: Skip | None = None
    location_filtered: tuple[Skip, ...] = ()
    duplicates: tuple[Skip, ...] = ()


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder, as :func:`open_series` opened it.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: Modality of the first file found.
        dicom_patient_id: PatientID of the first file found, ``""`` when absent.
        slices: the slices kept: one orientation and pixel spacing, one file per z, sorted by z.
        files: every file of the series, placed or not, relative to the root the paths are reported against.
        image_files: how many files were placed as image slices before the consistency checks (0: the series
            holds no image, e.g. a structured report).
        report: every file left out, and why.
    """

    study_uid: str
    series_uid: str
    modality: str
    dicom_patient_id: str
    slices: tuple[DicomSlice, ...]
    files: tuple[str, ...]
    image_files: int
    report: SeriesReport


@dataclass(frozen=True)
class SeriesFolder:
    """A folder of DICOM files opened as series by :func:`open_series`.

    Attributes:
        folder: the folder scanned.
        root: the folder that file paths in slices and skips are relative to.
        series: the series asked for (under each StudyInstanceUID it appears in), or every series of the folder,
            ordered by (StudyInstanceUID, SeriesInstanceUID).
        unreadable: the files that belong to no series (not DICOM, unreadable header, no Study/Series UID).
        found: every file under the folder, relative to ``root``, in walk order.
    """

    folder: Path
    root: Path
    series: tuple[DicomSeries, ...]
    unreadable: tuple[Skip, ...]
    found: tuple[str, ...]

    def whole_series(self, series_uid: str) -> DicomSeries:
        """Series ``series_uid`` with every one of its files a usable slice, for a reader that needs them all.

        Of two files at one z the one preprocessing keeps is used, and the other is logged.

        Raises:
            ValueError: the folder holds no such series, or holds it under several StudyInstanceUIDs; a file of
                the series is cut short or cannot be placed; the slices disagree on orientation or pixel
                spacing, or the series is oblique; or no slice is left. The message names the folder or the
                file and the reason.
        """
        matches = [series for series in self.series if series.series_uid == str(series_uid)]
        if not matches:
            present = [(series.series_uid, series.image_files) for series in self.series]
            raise _no_such_series(self.folder, str(series_uid), present=present)
        if len(matches) > 1:
            raise ValueError(f"{self.folder}: series {series_uid} appears under {len(matches)} StudyInstanceUIDs.")
        series = matches[0]
        report = series.report
        problems = [*report.incomplete, *([report.refusal] if report.refusal else []), *report.other_geometry]
        if problems:
            problem = problems[0]
            where = self.root / problem.path if problem.path else self.folder
            detail = f" ({problem.detail})" if problem.detail else ""
            raise ValueError(f"{where}: {problem.reason}{detail}; series {series_uid} cannot be used.")
        if not series.slices:
            raise ValueError(f"{self.folder}: series {series_uid} has no slice left after the SliceLocation filter.")
        for skip in report.duplicates:
            logger.warning("%s: %s; %s", self.root / (skip.path or ""), skip.reason, skip.detail)
        return series


def open_series(
    folder: str | Path,
    series_uid: str | None = None,
    *,
    root: str | Path | None = None,
    patient_id: str = "",
    slice_location_filter: bool = False,
) -> SeriesFolder:
    """Scan a folder of DICOM files once and open its series: consistent slices, one per z, sorted by z, and
    a report of every file left out and why.

    Nothing about the files raises: every file found ends up in exactly one place, a series' ``slices``, a
    skip of its series' ``report``, or the folder's ``unreadable``.

    Args:
        folder: the folder; any nesting below it is accepted.
        series_uid: the series to open; every series of the folder when None.
        root: the folder that file paths are reported relative to (preprocessing's ``--dicom-root``); default
            ``folder``.
        patient_id: the patient the skip records name (preprocessing's bookkeeping).
        slice_location_filter: drop slices whose |SliceLocation| != |ImagePositionPatient z|.

    Returns:
        The opened folder; its ``series`` are ordered by (StudyInstanceUID, SeriesInstanceUID).

    Raises:
        ValueError: ``folder`` is not a folder, or holds no file of series ``series_uid`` (the message lists the
            series it holds).

    Example:
        >>> opened = open_series("CT/LIDC-IDRI-0001", root="CT", patient_id="LIDC-IDRI-0001")  # doctest: +SKIP
        >>> [(s.series_uid, len(s.slices), len(s.report.duplicates)) for s in opened.series]  # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"DICOM folder {folder} does not exist or is not a folder.")
    root = folder if root is None else Path(root)
    grouped, unreadable, found = _read_headers(folder, root=root, patient_id=patient_id)
    chosen = [files for files in grouped if series_uid is None or files.series_uid == str(series_uid)]
    opened = tuple(
        _open_one(files, patient_id=patient_id, slice_location_filter=slice_location_filter) for files in chosen
    )
    if series_uid is not None and not opened:
        raise _no_such_series(folder, str(series_uid), present=[(f.series_uid, len(f.placed)) for f in grouped])
    return SeriesFolder(folder=folder, root=root, series=opened, unreadable=tuple(unreadable), found=tuple(found))


def _no_such_series(folder: Path, series_uid: str, present: Iterable[tuple[str, int]]) -> ValueError:
    """The error for a series the folder does not hold; ``present`` lists (series UID, image files) it does."""
    listing = ", ".join(f"{uid} ({count} image files)" for uid, count in present) or "none"
    return ValueError(f"{folder} holds no DICOM series {series_uid}; it holds: {listing}.")


@dataclass
class _SeriesFiles:
    """The files of one (study, series) pair as the header scan finds them, before the series is reduced."""

    study_uid: str
    series_uid: str
    modality: str
    dicom_patient_id: str
    placed: list[DicomSlice] = field(default_factory=list)
    incomplete: list[Skip] = field(default_factory=list)


def _read_headers(folder: Path, root: Path, patient_id: str) -> tuple[list[_SeriesFiles], list[Skip], list[str]]:
    """Every file's header under ``folder``, grouped by (study, series) in sorted order; the files of no series;
    and every file found, relative to ``root``, in walk order."""
    series: dict[tuple[str, str], _SeriesFiles] = {}
    unreadable: list[Skip] = []
    found: list[str] = []
    for path in walk_files(folder):
        relative = relative_posix(path, root)
        found.append(relative)
        header = read_file_header(path, relative, patient_id)
        if not header.series_uid:
            unreadable.append(header.skip)
            continue
        key = (header.study_uid, header.series_uid)
        entry = series.setdefault(key, _SeriesFiles(*key, header.modality, header.dicom_patient_id))
        if header.slice is not None:
            entry.placed.append(header.slice)
        else:
            entry.incomplete.append(header.skip)
    return [series[key] for key in sorted(series)], unreadable, found


def _open_one(files: _SeriesFiles, patient_id: str, slice_location_filter: bool) -> DicomSeries:
    """Reduce one series' placed files to consistent slices, one per z, sorted by z (the module's steps 2-4)."""
    kept, other_geometry, refusal = consistent_slices(files.placed, patient_id=patient_id, series_uid=files.series_uid)
    slices, z_skips = slice_by_z(
        kept, patient_id=patient_id, series_uid=files.series_uid, slice_location_filter=slice_location_filter
    )
    filtered = [skip.reason.startswith("SliceLocation filter") for skip in z_skips]
    report = SeriesReport(
        incomplete=tuple(files.incomplete),
        other_geometry=tuple(other_geometry),
        refusal=refusal,
        location_filtered=tuple(skip for skip, out in zip(z_skips, filtered) if out),
        duplicates=tuple(skip for skip, out in zip(z_skips, filtered) if not out),
    )
    return DicomSeries(
        study_uid=files.study_uid,
        series_uid=files.series_uid,
        modality=files.modality,
        dicom_patient_id=files.dicom_patient_id,
        slices=tuple(slices),
        files=tuple([s.relative_path for s in files.placed] + [s.path for s in files.incomplete if s.path]),
        image_files=len(files.placed),
        report=report,
    )


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
    by ImageOrientationPatient (within :data:`~car_med.ct.dicom.ORIENTATION_TOLERANCE`) and PixelSpacing
    (within :data:`~car_med.ct.dicom.PIXEL_SPACING_TOLERANCE_MM`). The group holding more than half of the
    slices is the series' geometry and its slices are kept; every other slice is dropped with a file skip
    naming its values and the series'. Without such a majority, or when the series' slice normal is more than
    :data:`~car_med.ct.dicom.OBLIQUE_TOLERANCE_DEG` from the scanner z axis (an oblique or tilted acquisition,
    whose slice positions are not one z each), the whole series is refused.

    Args:
        files: the placed slices of one series.
        patient_id: for skip records.
        series_uid: for skip records.

    Returns:
        ``(kept slices, file skips for dropped slices, scan skip or None)``; with a scan skip nothing is kept.
    """
    ordered = sorted(files, key=lambda s: (s.relative_path, s.path))
    groups = _geometry_groups(ordered)
    if not groups:
        return [], [], None
    majority = max(groups, key=len)  # the first of equal groups; only a strict majority is used below
    if 2 * len(majority) <= len(ordered):
        return [], [], _no_majority(groups, patient_id, series_uid)
    reference = majority[0]
    oblique = _oblique(reference, patient_id, series_uid)
    if oblique is not None:
        return [], [], oblique
    kept_ids = {id(item) for item in majority}
    skips = [
        _other_geometry(item, reference=reference, patient_id=patient_id, series_uid=series_uid)
        for item in ordered
        if id(item) not in kept_ids
    ]
    return [item for item in ordered if id(item) in kept_ids], skips, None


def _geometry_groups(ordered: list[DicomSlice]) -> list[list[DicomSlice]]:
    """The slices grouped by orientation and pixel spacing, groups in the order of their first slice."""
    groups: list[list[DicomSlice]] = []
    for item in ordered:
        for group in groups:
            if all(_same_geometry(group[0], item)):
                group.append(item)
                break
        else:
            groups.append([item])
    return groups


def _no_majority(groups: list[list[DicomSlice]], patient_id: str, series_uid: str) -> Skip:
    detail = "; ".join(
        f"{len(g)} slice(s) with orientation {_format_values(g[0].orientation)}, "
        f"PixelSpacing {_format_values(g[0].pixel_spacing)}"
        for g in groups
    )
    reason = "slices disagree on orientation or PixelSpacing, none in the majority; not cropped"
    return Skip("scan", reason, patient_id, series_uid, detail=detail[:300])


def _oblique(reference: DicomSlice, patient_id: str, series_uid: str) -> Skip | None:
    """The refusal of a series whose slice normal is more than the tolerance off z, else None."""
    normal = reference.geometry.normal
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / float(np.linalg.norm(normal))))))
    if tilt <= OBLIQUE_TOLERANCE_DEG:
        return None
    detail = f"orientation {_format_values(reference.orientation)}, normal {tilt:.2f} deg from z"
    return Skip(
        "scan", "oblique series: slice normal is not along z; not cropped", patient_id, series_uid, detail=detail
    )


def _other_geometry(item: DicomSlice, reference: DicomSlice, patient_id: str, series_uid: str) -> Skip:
    """The file skip of a slice outside the series' majority, naming what differs."""
    same_orientation, _ = _same_geometry(reference, item)
    if not same_orientation:
        reason = "other orientation than the rest of the series"
        detail = (
            f"ImageOrientationPatient {_format_values(item.orientation)}, "
            f"series {_format_values(reference.orientation)}"
        )
    else:
        reason = "other PixelSpacing than the rest of the series"
        detail = f"PixelSpacing {_format_values(item.pixel_spacing)}, series {_format_values(reference.pixel_spacing)}"
    return Skip("file", reason, patient_id, series_uid, item.relative_path, item.z, detail=detail)


def slice_by_z(
    files: Iterable[DicomSlice], patient_id: str, series_uid: str, slice_location_filter: bool
) -> tuple[list[DicomSlice], list[Skip]]:
    """Choose one file per z, optionally dropping files whose |SliceLocation| != |ImagePositionPatient z|.

    Duplicate z positions keep the lowest InstanceNumber, as pylidc's loader does, then the first path in
    sorted order; every other file at that z is a file skip naming the one kept.

    Returns:
        ``(slices sorted by z, file-level skips)``: the SliceLocation filter's skips first, then the duplicates.
    """
    skips: list[Skip] = []
    kept: list[DicomSlice] = []
    for item in files:
        skip = _slice_location_skip(item, patient_id, series_uid) if slice_location_filter else None
        if skip is not None:
            skips.append(skip)
        else:
            kept.append(item)
    kept.sort(key=lambda s: (s.z, s.instance_number, s.relative_path))
    unique: list[DicomSlice] = []
    for item in kept:
        if unique and abs(unique[-1].z - item.z) <= Z_TOLERANCE_MM:
            skips.append(_duplicate(item, kept=unique[-1], patient_id=patient_id, series_uid=series_uid))
            continue
        unique.append(item)
    return unique, skips


def _slice_location_skip(item: DicomSlice, patient_id: str, series_uid: str) -> Skip | None:
    """The SliceLocation filter's skip of a slice, or None when the slice passes."""
    if item.slice_location is None:
        reason = "SliceLocation filter: no SliceLocation"
        return Skip("file", reason, patient_id, series_uid, item.relative_path, item.z)
    if abs(abs(item.slice_location) - abs(item.z)) > Z_TOLERANCE_MM:
        reason = "SliceLocation filter: |SliceLocation| != |ImagePositionPatient z|"
        detail = f"SliceLocation={item.slice_location}"
        return Skip("file", reason, patient_id, series_uid, item.relative_path, item.z, detail=detail)
    return None


def _duplicate(item: DicomSlice, kept: DicomSlice, patient_id: str, series_uid: str) -> Skip:
    """The skip of ``item``, at the z of ``kept``."""
    if item.sop_instance_uid and item.sop_instance_uid == kept.sop_instance_uid:
        why = "a copy: same SOPInstanceUID"
    elif item.instance_number == kept.instance_number:
        why = "same InstanceNumber; first path in sorted order kept"
    else:
        why = "lower InstanceNumber kept"
    reason = "duplicate slice position: another file of the series has this z"
    detail = f"kept {kept.relative_path} ({why})"
    return Skip("file", reason, patient_id, series_uid, item.relative_path, item.z, detail=detail)
