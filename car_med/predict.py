"""``python -m car_med.predict``: CAR samples for a new patient's CT, from a DICOM series and nodule positions.

A radiologist's new scan has no LIDC annotations, so it has no crops in any ``datalist.json``. This command
reads the series with the library's CT reader (:mod:`car_med.ct`, the one preprocessing uses), takes every
axial slice within ``diameter_mm / 2`` of each nodule's centre, cuts the 180x180 crop at 0.5 mm centred on the
nodule's (x, y) on each slice (:func:`car_med.ct.crop_grid`, :func:`car_med.ct.resample_image`: the crop
preprocessing would cut at that centre, -1024 HU outside the slice), and exports them as the review export does
(:func:`car_med.export.export_items`): per crop NIfTI and a montage, the samples on the CT grid, one DICOM SEG
per nodule and the review page.

By default sample m of a nodule uses one noise vector on every slice of the nodule (the slices share their noise
seed), so volume m of ``samples_ct.nii.gz`` and segment m of ``seg.dcm`` are one 3D hypothesis.
``--independent-slices`` draws every slice's noise on its own, as the export of a datalist does.

The nodule CSV has one row per nodule, ``nodule_id,x,y,z[,diameter_mm]``, in DICOM patient coordinates (LPS,
millimetres), as PACS viewers and CAD tools report them; ``diameter_mm`` defaults to 10.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shlex
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from car_med.ct import (
    DicomSlice,
    consistent_slices,
    crop_grid,
    decode_hu,
    lps_to_pixel,
    read_series_headers,
    resample_image,
    slice_by_z,
    write_crop_nifti,
)
from car_med.data.lidc import DEFAULT_HU_WINDOW
from car_med.export.files import safe_path_part

__all__ = ["DEFAULT_DIAMETER_MM", "NodulePoint", "SeriesSlices", "main", "predict_nodules", "read_nodule_csv"]

logger = logging.getLogger(__name__)

DEFAULT_DIAMETER_MM = 10.0
"""The slab taken around a nodule's centre when the CSV gives no diameter."""

CSV_COLUMNS = ("nodule_id", "x", "y", "z")
_Z_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class NodulePoint:
    """One row of the nodule CSV: an id, the centre in LPS mm and the diameter that sets the slab of slices."""

    nodule_id: str
    centre: tuple[float, float, float]
    diameter_mm: float
    row: int


@dataclass
class SeriesSlices:
    """The series' slices, one per z, sorted by z, with the folder they were read from."""

    folder: Path
    series_uid: str
    patient_id: str
    slices: list[DicomSlice]

    @property
    def zs(self) -> np.ndarray:
        return np.asarray([s.z for s in self.slices])


def _number(value: str | None, path: Path, row: int, column: str) -> float:
    try:
        number = float(value) if value not in (None, "") else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{path} row {row}: column {column!r}: expected a number (mm), got {value!r}.")
    return number


def read_nodule_csv(path: str | Path) -> list[NodulePoint]:
    """Read and check the nodule CSV (``nodule_id,x,y,z[,diameter_mm]``; rows are numbered from 2, the header
    being row 1, as a spreadsheet shows them).

    Raises:
        ValueError: a missing file or column, a non-numeric or non-finite coordinate, a diameter that is not
            positive, an empty or repeated ``nodule_id``, or no row at all; the message names the file, the row
            and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"nodule CSV {path} does not exist.")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected the header nodule_id,x,y,z[,diameter_mm], got "
                f"{columns}."
            )
        nodules: list[NodulePoint] = []
        seen: dict[str, int] = {}
        for row_number, raw in enumerate(reader, start=2):
            row = {str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in raw.items()}
            nodule_id = row.get("nodule_id") or ""
            if not nodule_id:
                raise ValueError(f"{path} row {row_number}: column 'nodule_id' is empty.")
            if nodule_id in seen:
                raise ValueError(
                    f"{path} row {row_number}: nodule_id {nodule_id!r} repeats row {seen[nodule_id]}; ids must be "
                    "unique."
                )
            seen[nodule_id] = row_number
            centre = tuple(_number(row.get(c), path, row_number, c) for c in ("x", "y", "z"))
            diameter = DEFAULT_DIAMETER_MM
            if row.get("diameter_mm") not in (None, ""):
                diameter = _number(row["diameter_mm"], path, row_number, "diameter_mm")
                if diameter <= 0:
                    raise ValueError(f"{path} row {row_number}: column 'diameter_mm' must be > 0, got {diameter}.")
            nodules.append(NodulePoint(nodule_id, centre, diameter, row_number))
    if not nodules:
        raise ValueError(f"{path} has a header but no nodule rows.")
    return nodules


def read_series(folder: str | Path, series_uid: str | None = None) -> SeriesSlices:
    """The axial CT series in ``folder`` (any nesting), checked as preprocessing checks a series.

    Raises:
        ValueError: the folder holds no image series, holds several and ``series_uid`` does not choose one (the
            message lists them), a file of the series is cut short, or the series is oblique or non-axial, or its
            slices disagree on orientation or pixel spacing; the message names the folder, the series or the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--dicom {folder} is not a folder.")
    found, _, _ = read_series_headers(folder, folder, "")
    images = {uid: files for (_, uid), files in found.items() if files.slices}
    if series_uid is not None:
        if series_uid not in images:
            raise ValueError(f"{folder} holds no image series {series_uid}; it holds {sorted(images) or 'none'}.")
        uid = series_uid
    elif len(images) == 1:
        uid = next(iter(images))
    elif not images:
        raise ValueError(f"{folder} holds no DICOM image series (no file with ImagePositionPatient and pixels).")
    else:
        listing = ", ".join(f"{u} ({len(f.slices)} slices)" for u, f in sorted(images.items()))
        raise ValueError(f"{folder} holds {len(images)} series: {listing}; choose one with --series-uid.")
    files = images[uid]
    if files.incomplete:
        bad = files.incomplete[0]
        raise ValueError(f"{folder / (bad.path or '')}: {bad.reason} ({bad.detail}); series {uid} cannot be used.")
    placed, dropped, refusal = consistent_slices(files.slices, "", uid)
    if refusal is not None:
        raise ValueError(f"{folder}: series {uid}: {refusal.reason} ({refusal.detail}).")
    if dropped:
        bad = dropped[0]
        raise ValueError(f"{folder / (bad.path or '')}: {bad.reason} ({bad.detail}).")
    slices, duplicates = slice_by_z(placed, "", uid, slice_location_filter=False)
    for skip in duplicates:
        logger.warning("%s: %s; %s", folder / (skip.path or ""), skip.reason, skip.detail)
    steps = np.diff([s.z for s in slices])
    spacing = float(np.median(steps)) if len(steps) else 1.0
    slices = [replace(s, geometry=replace(s.geometry, slice_spacing=spacing)) for s in slices]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = pydicom.dcmread(slices[0].path, stop_before_pixels=True, specific_tags=["PatientID"])
    return SeriesSlices(folder, uid, str(header.get("PatientID", "") or "patient"), slices)


def nodule_slices(series: SeriesSlices, nodule: NodulePoint, where: str) -> list[DicomSlice]:
    """The slices within ``diameter_mm / 2`` of the nodule's z, after checking that the nodule lies in the volume.

    Raises:
        ValueError: the centre lies outside the slices' in-plane extent, or the slab runs past the series' first
            or last slice; ``where`` names the CSV row.
    """
    x, y, z = nodule.centre
    half = nodule.diameter_mm / 2
    zs = series.zs
    if z - half < zs[0] - _Z_TOLERANCE_MM or z + half > zs[-1] + _Z_TOLERANCE_MM:
        raise ValueError(
            f"{where}: nodule {nodule.nodule_id!r} at z={z:g} mm with diameter {nodule.diameter_mm:g} mm needs slices "
            f"from z={z - half:g} to {z + half:g} mm; the series runs from {zs[0]:g} to {zs[-1]:g} mm."
        )
    geometry = series.slices[int(np.abs(zs - z).argmin())].geometry
    row, column, _ = lps_to_pixel(geometry, (x, y, z))
    rows, columns = geometry.shape
    if not (-0.5 <= row <= rows - 0.5 and -0.5 <= column <= columns - 0.5):
        raise ValueError(
            f"{where}: nodule {nodule.nodule_id!r} at (x, y) = ({x:g}, {y:g}) mm lies outside the slices (pixel row "
            f"{row:.1f}, column {column:.1f} of {rows}x{columns}); coordinates must be DICOM patient (LPS) mm."
        )
    chosen = [s for s in series.slices if abs(s.z - z) <= half + _Z_TOLERANCE_MM]
    if not chosen:
        raise ValueError(f"{where}: no slice lies within {half:g} mm of z={z:g} mm (slice spacing too large).")
    return chosen


def cut_crop(item: DicomSlice, centre_lps: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The 180x180 crop at 0.5 mm of one slice centred on an LPS point, as preprocessing cuts it: ``(int16 HU
    [row, column], RAS affine)``."""
    row, column, _ = lps_to_pixel(item.geometry, centre_lps)
    grid = crop_grid(item.geometry, (row, column))
    return resample_image(decode_hu(item), grid), grid.affine


def crop_items(
    series: SeriesSlices, nodules: Sequence[NodulePoint], crop_dir: Path, csv_path: Path, independent: bool
) -> list[dict[str, Any]]:
    """Cut every nodule's crops into ``crop_dir`` and describe each as a datalist item for the export."""
    plans = [(n, nodule_slices(series, n, f"{csv_path} row {n.row}")) for n in nodules]  # every check first
    items: list[dict[str, Any]] = []
    for position, (nodule, slices) in enumerate(plans):
        nodule_part = safe_path_part(nodule.nodule_id, "nodule_id")
        for item in slices:
            k = next(i for i, s in enumerate(series.slices) if s is item)
            image, affine = cut_crop(item, (nodule.centre[0], nodule.centre[1], item.z))
            path = crop_dir / f"{nodule_part}_k{k:04d}_image.nii.gz"
            write_crop_nifti(path, image, affine)
            case_index = len(items)
            items.append(
                {
                    "image": str(path),
                    "label": [],
                    "intensity": "hu",
                    "patient_id": series.patient_id,
                    "series_uid": series.series_uid,
                    "nodule_id": nodule.nodule_id,
                    "slice_index": k,
                    "slice_z": item.z,
                    "source_file": item.relative_path,
                    "sop_instance_uid": item.sop_instance_uid,
                    "case_index": case_index,
                    "case_id": f"{nodule_part}_k{k:04d}",
                    "noise_index": case_index if independent else position,
                    "centre_lps": [float(v) for v in (nodule.centre[0], nodule.centre[1], item.z)],
                }
            )
    return items


def predict_nodules(
    model: str | Path,
    dicom: str | Path,
    nodules_csv: str | Path,
    output_dir: str | Path,
    *,
    num_samples: int = 16,
    seed: int = 0,
    series_uid: str | None = None,
    overwrite: bool = False,
    independent_slices: bool = False,
    dicom_seg: bool = True,
    tracking_uri: str | None = None,
    device: str = "cpu",
    roi_size: Sequence[int] = (128, 128),
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    progress: bool = True,
    command: str | None = None,
):
    """Predict on every nodule of the CSV and write the review export into ``output_dir``.

    Every input is checked before anything is written. Returns the export's
    :class:`~car_med.export.run.ExportSummary`.
    """
    from car_med.export.run import export_items

    if dicom is None or nodules_csv is None:
        raise ValueError(
            "prediction needs the CT series folder and the nodule CSV (bundle keys predict_dicom and "
            "predict_nodules, or --dicom and --nodules)."
        )
    nodules = read_nodule_csv(nodules_csv)
    series = read_series(dicom, series_uid)
    for nodule in nodules:
        nodule_slices(series, nodule, f"{nodules_csv} row {nodule.row}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    noise = "independent per slice" if independent_slices else "shared by the slices of a nodule"
    origin = {
        "prediction": {
            "dicom": str(Path(dicom).resolve()),
            "series_uid": series.series_uid,
            "nodules_csv": str(Path(nodules_csv).resolve()),
            "noise": noise,
        },
        "case_seed": "seed * 1000003 + noise_index: "
        + ("the crop's position in the run" if independent_slices else "the nodule's row position in the CSV"),
    }
    # the crops are inputs of the export, which copies each into its case folder; they need not stay
    with tempfile.TemporaryDirectory(prefix="car-predict-crops-") as crop_dir:
        items = crop_items(series, nodules, Path(crop_dir), Path(nodules_csv), independent_slices)
        return export_items(
            model,
            items,
            out,
            origin,
            num_samples=num_samples,
            seed=seed,
            dicom_root=series.folder,
            full_volume=True,
            dicom_seg=dicom_seg,
            overwrite=overwrite,
            tracking_uri=tracking_uri,
            device=device,
            roi_size=roi_size,
            hu_window=hu_window,
            progress=progress,
            command=command,
        )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m car_med.predict",
        description="CAR samples for a new patient: a DICOM series and nodule positions in, review files out "
        "(crop NIfTI, samples on the CT grid, DICOM SEG per nodule, index.html).",
    )
    parser.add_argument("--model", required=True, help="models:/NAME/VERSION or @ALIAS, runs:/..., a model folder, "
                        "or a bundle output folder")  # fmt: skip
    parser.add_argument("--dicom", required=True, help="the CT series folder (any nesting)")
    parser.add_argument("--nodules", required=True, help="CSV nodule_id,x,y,z[,diameter_mm] in LPS mm")
    parser.add_argument("--output-dir", required=True, help="the review folder")
    parser.add_argument("--num-samples", type=int, default=16, help="samples per nodule, M (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--series-uid", help="the series to use when the folder holds several")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in the folder")
    parser.add_argument("--independent-slices", action="store_true",
                        help="draw each slice's noise on its own (default: shared by a nodule's slices)")  # fmt: skip
    parser.add_argument("--no-dicom-seg", action="store_true", help="skip the DICOM SEG files")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("--roi-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
                        help="model input window (the training roi_size; default 128 128)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (2 for bad input, 1 when a nodule failed)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    from car_med.export.run import print_summary

    words = ["python", "-m", "car_med.predict", *(sys.argv[1:] if argv is None else argv)]
    try:
        summary = predict_nodules(
            args.model,
            args.dicom,
            args.nodules,
            args.output_dir,
            num_samples=args.num_samples,
            seed=args.seed,
            series_uid=args.series_uid,
            overwrite=args.overwrite,
            independent_slices=args.independent_slices,
            dicom_seg=not args.no_dicom_seg,
            tracking_uri=args.tracking_uri,
            device=args.device,
            roi_size=tuple(args.roi_size),
            progress=not args.no_progress,
            command=shlex.join(words),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return print_summary(summary)


if __name__ == "__main__":
    sys.exit(main())
