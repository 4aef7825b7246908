"""``python -m car_med.predict``: CAR samples for a new patient's CT, from a DICOM series or a NIfTI volume and
nodule positions or regions.

A radiologist's new scan has no LIDC annotations, so it has no crops in any ``datalist.json``. This command
opens the CT with the library's CT reader (:func:`car_med.ct.open_series`, the one preprocessing uses), takes every
axial slice within ``diameter_mm / 2`` of each nodule's centre (with ``--roi``: every slice its mask touches,
centred on the mask's centroid), cuts the 180x180 crop at 0.5 mm centred on the
nodule's (x, y) on each slice (:func:`car_med.ct.crop_grid`, :func:`car_med.ct.resample_image`: the crop
preprocessing would cut at that centre, -1024 HU outside the slice), and exports them as the review export does
(:func:`car_med.export.export_items`): per crop NIfTI and a montage, the samples on the CT grid, one DICOM SEG
per nodule and the review page.

By default sample m of a nodule uses one noise vector on every slice of the nodule (the slices share their noise
seed), so volume m of ``samples_ct.nii.gz`` and segment m + 1 of ``seg.dcm`` are one 3D outline (samples are
numbered from 0, as in the file names). ``--independent-slices`` draws every slice's noise on its own, as the
export of a datalist does. Each nodule's M outlines are grouped into hypotheses with their probabilities
(``hypotheses.json``, ``hypotheses_seg.dcm``, the review page; ``--min-iou``, ``--confidence``).

The nodule CSV has one row per nodule, ``nodule_id,x,y,z[,diameter_mm]``, in DICOM patient coordinates (LPS,
millimetres), as PACS viewers and CAD tools report them; ``diameter_mm`` defaults to 10. ``--roi`` takes a NIfTI
label map on the CT's grid (one positive label per nodule) or a DICOM SEG of the series (one segment per
nodule). A NIfTI CT gets no DICOM SEG: a SEG must reference the DICOM instances it was drawn on.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from car_med.ct import (
    LPS_TO_RAS,
    CTSeries,
    DicomSeries,
    SeriesFolder,
    SliceGeometry,
    crop_grid,
    decode_hu,
    lps_to_pixel,
    nifti,
    open_series,
    read_nodule_roi,
    resample_image,
    series_volume,
    write_crop_nifti,
)
from car_med.data.lidc import DEFAULT_HU_WINDOW
from car_med.export.cli import add_sampling_arguments, run_export_command, sampling_options
from car_med.export.files import safe_path_part
from car_med.hypotheses import DEFAULT_CONFIDENCE, DEFAULT_MIN_IOU

__all__ = [
    "DEFAULT_DIAMETER_MM",
    "CTPlane",
    "NodulePoint",
    "PredictionCT",
    "main",
    "predict_nodules",
    "read_nodule_csv",
    "roi_nodules",
]

logger = logging.getLogger(__name__)

DEFAULT_DIAMETER_MM = 10.0
#: M per nodule: a 95% interval of +-0.16 at p = 0.5 for about 5 s per 10-slice nodule on 2 CPU threads
#: (benchmarks/bench_hypotheses.py; the table and the choice are in docs/review.md)
DEFAULT_NUM_SAMPLES = 32
"""The slab taken around a nodule's centre when the CSV gives no diameter."""

CSV_COLUMNS = ("nodule_id", "x", "y", "z")
_Z_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class NodulePoint:
    """One nodule: an id, the centre in LPS mm, and the slices to take.

    Attributes:
        nodule_id: the CSV's ``nodule_id``, or the ROI's label or segment number.
        centre: ``(x, y, z)`` in LPS mm; every crop is centred on ``(x, y)``.
        diameter_mm: the slab of slices around ``z`` (CSV rows).
        where: the CSV row or ROI label, for error messages.
        slice_zs: the z of every slice an ROI mask touches; ``None`` for CSV rows (the slab is used).
    """

    nodule_id: str
    centre: tuple[float, float, float]
    diameter_mm: float
    where: str
    slice_zs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CTPlane:
    """One axial slice of the CT: where it lies, where it came from, and how to read its HU ``[row, column]``."""

    geometry: SliceGeometry
    z: float
    source_file: str
    sop_instance_uid: str
    read_hu: Callable[[], np.ndarray] = field(repr=False, compare=False)


@dataclass
class PredictionCT:
    """The CT to predict on: its axial slices sorted by z and, once read, the whole volume.

    Attributes:
        source: the DICOM folder or the NIfTI file.
        series_uid: SeriesInstanceUID, or the NIfTI file's name without extension.
        patient_id: PatientID, or the NIfTI file's name.
        planes: the axial slices, sorted by z.
        volume: the whole CT (the NIfTI's, or the DICOM series decoded as one volume when an ROI or the export
            needs it).
        series: the opened DICOM series the planes come from (None for a NIfTI CT), so its volume is built
            without a second scan of the folder.
    """

    source: Path
    series_uid: str
    patient_id: str
    planes: list[CTPlane]
    volume: CTSeries | None = None
    series: DicomSeries | None = field(default=None, repr=False)

    @property
    def zs(self) -> np.ndarray:
        return np.asarray([p.z for p in self.planes])

    @property
    def is_dicom(self) -> bool:
        return self.source.is_dir()

    def whole_volume(self) -> CTSeries:
        """The whole CT as one volume, decoded from the opened series on first use.

        Raises:
            ValueError: as :func:`car_med.ct.series_volume` (slices of different sizes, uneven slice steps).
        """
        if self.volume is None:
            self.volume = series_volume(self.series, self.source)
        return self.volume


class _VolumeOnDemand(Mapping[str, CTSeries]):
    """The CT's volume by its series UID, decoded when the export first asks for it: a series that cannot be
    one regular volume then fails the export's full-volume step (and marks its cases), not the crops."""

    def __init__(self, ct: PredictionCT) -> None:
        self._ct = ct

    def __getitem__(self, series_uid: str) -> CTSeries:
        if series_uid != self._ct.series_uid:
            raise KeyError(series_uid)
        return self._ct.whole_volume()

    def __iter__(self) -> Iterator[str]:
        return iter([self._ct.series_uid])

    def __len__(self) -> int:
        return 1


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
            nodules.append(NodulePoint(nodule_id, centre, diameter, f"{path} row {row_number}"))
    if not nodules:
        raise ValueError(f"{path} has a header but no nodule rows.")
    return nodules


def read_dicom_ct(folder: str | Path, series_uid: str | None = None) -> PredictionCT:
    """The axial CT series in ``folder`` (any nesting), opened as preprocessing opens a series
    (:func:`car_med.ct.open_series`: the folder is scanned once, here).

    Raises:
        ValueError: the folder holds no image series, holds several and ``series_uid`` does not choose one (the
            message lists them), a file of the series is cut short, or the series is oblique or non-axial, or its
            slices disagree on orientation or pixel spacing; the message names the folder, the series or the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--dicom {folder} is not a folder.")
    opened = open_series(folder, series_uid)
    uid = series_uid if series_uid is not None else _only_image_series(opened)
    series = opened.whole_series(uid)
    steps = np.diff([s.z for s in series.slices])
    spacing = float(np.median(steps)) if len(steps) else 1.0
    slices = [replace(s, geometry=replace(s.geometry, slice_spacing=spacing)) for s in series.slices]
    planes = [CTPlane(s.geometry, s.z, s.relative_path, s.sop_instance_uid, partial(decode_hu, s)) for s in slices]
    return PredictionCT(folder, uid, series.dicom_patient_id or "patient", planes, series=series)


def _only_image_series(opened: SeriesFolder) -> str:
    """The UID of the folder's one image series.

    Raises:
        ValueError: the folder holds no image series, or several (the message lists them).
    """
    images = {series.series_uid: series for series in opened.series if series.image_files}
    if len(images) == 1:
        return next(iter(images))
    if not images:
        raise ValueError(f"{opened.folder} holds no DICOM image series (no file with ImagePositionPatient and pixels).")
    listing = ", ".join(f"{uid} ({series.image_files} slices)" for uid, series in sorted(images.items()))
    raise ValueError(f"{opened.folder} holds {len(images)} series: {listing}; choose one with --series-uid.")


def read_nifti_ct(path: str | Path) -> PredictionCT:
    """An axial NIfTI CT (:func:`car_med.ct.nifti.read_nifti_ct`) as slices, each described as a DICOM slice would
    be; the counterpart of :func:`read_dicom_ct`.

    Raises:
        ValueError: as :func:`car_med.ct.nifti.read_nifti_ct`.
    """
    volume = nifti.read_nifti_ct(path)
    planes = []
    for k in range(volume.shape[2]):
        geometry = volume.slice_geometry(k)
        planes.append(CTPlane(geometry, float(geometry.position[2]), Path(path).name, "", partial(volume.plane, k)))
    planes.sort(key=lambda p: p.z)
    return PredictionCT(Path(path), volume.series_uid, volume.series_uid, planes, volume)


def roi_nodules(ct: PredictionCT, roi: str | Path) -> list[NodulePoint]:
    """One nodule per label (NIfTI) or segment (DICOM SEG) of ``roi``: its centre is the mask's centroid (LPS mm),
    its slices every slice the mask touches.

    Raises:
        ValueError: as :func:`car_med.ct.read_nodule_roi`.
    """
    volume = ct.whole_volume()
    lps = LPS_TO_RAS @ volume.affine
    nodules = []
    for nodule_id, mask in read_nodule_roi(roi, volume).items():
        ijk = np.argwhere(mask).astype(np.float64)
        centre = lps @ np.append(ijk.mean(axis=0), 1.0)
        ks = np.unique(ijk[:, 2])
        zs = tuple(float((lps @ np.array([0.0, 0.0, k, 1.0]))[2]) for k in ks)
        extent = max(zs) - min(zs) + float(np.linalg.norm(lps[:3, 2]))
        where = f"ROI {roi} nodule {nodule_id}"
        nodules.append(NodulePoint(nodule_id, tuple(float(v) for v in centre[:3]), extent, where, tuple(sorted(zs))))
    return nodules


def nodule_slices(ct: PredictionCT, nodule: NodulePoint) -> list[int]:
    """Indices into ``ct.planes`` of the nodule's slices, after checking that the nodule lies in the volume.

    CSV rows take the slices within ``diameter_mm / 2`` of ``z``; ROI nodules the slices their mask touches.

    Raises:
        ValueError: the centre lies outside the slices' in-plane extent, or the slab runs past the series' first
            or last slice; the message names the CSV row or the ROI label.
    """
    x, y, z = nodule.centre
    zs = ct.zs
    if nodule.slice_zs is None:
        half = nodule.diameter_mm / 2
        if z - half < zs[0] - _Z_TOLERANCE_MM or z + half > zs[-1] + _Z_TOLERANCE_MM:
            raise ValueError(
                f"{nodule.where}: nodule {nodule.nodule_id!r} at z={z:g} mm with diameter {nodule.diameter_mm:g} mm "
                f"needs slices from z={z - half:g} to {z + half:g} mm; the series runs from {zs[0]:g} to {zs[-1]:g} mm."
            )
        chosen = [k for k, plane_z in enumerate(zs) if abs(plane_z - z) <= half + _Z_TOLERANCE_MM]
        if not chosen:
            raise ValueError(
                f"{nodule.where}: no slice lies within {half:g} mm of z={z:g} mm (slice spacing too large)."
            )
    else:
        chosen = sorted(int(np.abs(zs - slice_z).argmin()) for slice_z in nodule.slice_zs)
    geometry = ct.planes[int(np.abs(zs - z).argmin())].geometry
    row, column, _ = lps_to_pixel(geometry, (x, y, z))
    rows, columns = geometry.shape
    if not (-0.5 <= row <= rows - 0.5 and -0.5 <= column <= columns - 0.5):
        raise ValueError(
            f"{nodule.where}: nodule {nodule.nodule_id!r} at (x, y) = ({x:g}, {y:g}) mm lies outside the slices "
            f"(pixel row {row:.1f}, column {column:.1f} of {rows}x{columns}); coordinates must be DICOM patient (LPS) "
            "mm."
        )
    return chosen


def cut_crop(plane: CTPlane, centre_lps: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The 180x180 crop at 0.5 mm of one slice centred on an LPS point, as preprocessing cuts it: ``(int16 HU
    [row, column], RAS affine)``."""
    row, column, _ = lps_to_pixel(plane.geometry, centre_lps)
    grid = crop_grid(plane.geometry, (row, column))
    return resample_image(plane.read_hu(), grid), grid.affine


def crop_items(
    ct: PredictionCT, nodules: Sequence[NodulePoint], crop_dir: Path, independent: bool
) -> list[dict[str, Any]]:
    """Cut every nodule's crops into ``crop_dir`` and describe each as a datalist item for the export."""
    plans = [(n, nodule_slices(ct, n)) for n in nodules]  # every check first
    items: list[dict[str, Any]] = []
    for position, (nodule, ks) in enumerate(plans):
        nodule_part = safe_path_part(nodule.nodule_id, "nodule_id")
        for k in ks:
            plane = ct.planes[k]
            image, affine = cut_crop(plane, (nodule.centre[0], nodule.centre[1], plane.z))
            path = crop_dir / f"{nodule_part}_k{k:04d}_image.nii.gz"
            write_crop_nifti(path, image, affine)
            case_index = len(items)
            items.append(
                {
                    "image": str(path),
                    "label": [],
                    "intensity": "hu",
                    "patient_id": ct.patient_id,
                    "series_uid": ct.series_uid,
                    "nodule_id": nodule.nodule_id,
                    "slice_index": k,
                    "slice_z": plane.z,
                    "source_file": plane.source_file,
                    "sop_instance_uid": plane.sop_instance_uid,
                    "case_index": case_index,
                    "case_id": f"{nodule_part}_k{k:04d}",
                    "noise_index": case_index if independent else position,
                    "centre_lps": [float(v) for v in (nodule.centre[0], nodule.centre[1], plane.z)],
                }
            )
    return items


def read_prediction_inputs(
    dicom: str | Path | None,
    image: str | Path | None,
    nodules_csv: str | Path | None,
    roi: str | Path | None,
    series_uid: str | None = None,
) -> tuple[PredictionCT, list[NodulePoint]]:
    """Read and check the CT (one of ``dicom``, ``image``) and the nodules (one of ``nodules_csv``, ``roi``).

    Raises:
        ValueError: not exactly one CT or one nodule source is given, or any check of the readers fails.
    """
    if (dicom is None) == (image is None):
        raise ValueError(
            "give the CT as exactly one of a DICOM series folder (--dicom, bundle key predict_dicom) or a NIfTI "
            f"volume (--image, predict_image); got dicom={dicom!r}, image={image!r}."
        )
    if (nodules_csv is None) == (roi is None):
        raise ValueError(
            "give the nodules as exactly one of a CSV (--nodules, bundle key predict_nodules) or a label map / "
            f"DICOM SEG (--roi, predict_roi); got nodules={nodules_csv!r}, roi={roi!r}."
        )
    if image is not None and series_uid is not None:
        raise ValueError("--series-uid chooses a series in a DICOM folder; a NIfTI --image holds one volume.")
    nodules = read_nodule_csv(nodules_csv) if nodules_csv is not None else None
    ct = read_dicom_ct(dicom, series_uid) if dicom is not None else read_nifti_ct(image)
    if nodules is None:
        nodules = roi_nodules(ct, roi)
    for nodule in nodules:
        nodule_slices(ct, nodule)
    return ct, nodules


def predict_nodules(
    model: str | Path,
    dicom: str | Path | None,
    nodules_csv: str | Path | None,
    output_dir: str | Path,
    *,
    image: str | Path | None = None,
    roi: str | Path | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
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
    min_iou: float = DEFAULT_MIN_IOU,
    confidence: float = DEFAULT_CONFIDENCE,
):
    """Predict on every nodule and write the review export into ``output_dir``.

    The CT is a DICOM series folder (``dicom``) or a NIfTI volume (``image``); the nodules are a CSV
    (``nodules_csv``) or a label map / DICOM SEG (``roi``). Every input is checked before anything is written.
    A NIfTI CT gets no DICOM SEG (it has no instances to reference). Each nodule's M sample volumes (and each
    crop's samples) are grouped into hypotheses whose every two members overlap with IoU >= ``min_iou``, each
    with a Wilson interval at ``confidence`` (``hypotheses.json``, ``hypotheses_seg.dcm``). The other arguments
    are those of :func:`car_med.export.export_cases`. Returns the export's
    :class:`~car_med.export.run.ExportSummary`.
    """
    from car_med.export.run import ExportOptions, export_items

    options = ExportOptions(
        num_samples=num_samples,
        seed=seed,
        overwrite=overwrite,
        tracking_uri=tracking_uri,
        device=device,
        roi_size=roi_size,
        hu_window=hu_window,
        progress=progress,
        command=command,
        min_iou=min_iou,
        confidence=confidence,
    )
    ct, nodules = read_prediction_inputs(dicom, image, nodules_csv, roi, series_uid)
    if dicom_seg and not ct.is_dicom:
        logger.info("no DICOM SEG: the CT %s is a NIfTI volume, and a SEG must reference DICOM instances", image)
        dicom_seg = False
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    noise = "independent per slice" if independent_slices else "shared by the slices of a nodule"
    inputs: dict[str, Any] = {"dicom" if ct.is_dicom else "image": str(ct.source.resolve())}
    inputs.update({"series_uid": ct.series_uid, "noise": noise})
    inputs["nodules_csv" if nodules_csv is not None else "roi"] = str(Path(nodules_csv or roi).resolve())
    origin = {
        "prediction": inputs,
        "case_seed": "seed * 1000003 + noise_index: "
        + ("the crop's position in the run" if independent_slices else "the nodule's position in the input"),
    }
    # the export's full-volume step takes the volume from here, so the DICOM folder is not scanned again
    volumes: Mapping[str, CTSeries] = _VolumeOnDemand(ct)
    dicom_root = ct.source if ct.is_dicom else None
    # the crops are inputs of the export, which copies each into its case folder; they need not stay
    with tempfile.TemporaryDirectory(prefix="car-predict-crops-") as crop_dir:
        items = crop_items(ct, nodules, Path(crop_dir), independent_slices)
        return export_items(
            model, items, out, origin, options, dicom_root=dicom_root, volumes=volumes, full_volume=True,
            dicom_seg=dicom_seg,
        )  # fmt: skip


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m car_med.predict",
        description="CAR samples for a new patient: a CT (DICOM series or NIfTI) and nodule positions or regions "
        "in, review files out (crop NIfTI, samples on the CT grid, DICOM SEG per nodule, index.html).",
    )
    ct = parser.add_mutually_exclusive_group(required=True)
    ct.add_argument("--dicom", help="the CT series folder (any nesting)")
    ct.add_argument("--image", help="the CT as an axial NIfTI volume in HU (e.g. dcm2niix's output)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--nodules", help="CSV nodule_id,x,y,z[,diameter_mm] in LPS mm")
    where.add_argument("--roi", help="NIfTI label map on the CT's grid (one label per nodule) or a DICOM SEG of "
                       "the series (one segment per nodule)")  # fmt: skip
    parser.add_argument("--series-uid", help="the series to use when the folder holds several")
    parser.add_argument("--no-dicom-seg", action="store_true", help="skip the DICOM SEG files")
    add_sampling_arguments(parser, unit="nodule", default_num_samples=DEFAULT_NUM_SAMPLES)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (2 for bad input, 1 when a nodule failed)."""
    args = _parse_args(argv)

    def predict(words: list[str]):
        return predict_nodules(
            args.model,
            args.dicom,
            args.nodules,
            args.output_dir,
            image=args.image,
            roi=args.roi,
            series_uid=args.series_uid,
            dicom_seg=not args.no_dicom_seg,
            **sampling_options(args, words),
        )

    return run_export_command("car_med.predict", argv, predict)


if __name__ == "__main__":
    sys.exit(main())
