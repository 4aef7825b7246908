"""End-to-end tests of ``python -m preprocessing.lidc`` on a synthetic DICOM cohort of real DB scans.

Every expectation is recomputed here from pylidc's own API (``cluster_annotations``, ``image_k_position``,
``boolean_mask``) and from the DICOM files (pydicom, SimpleITK), never from the preprocessing's helpers.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from lidc_cohort import CLEAN_PATIENTS, NO_ANNOTATION_PATIENT, file_at_z, needed_zs, series_dir
from scipy.ndimage import map_coordinates

REPO_ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("training", "validation", "test")


def _items(out: Path) -> list[dict]:
    datalist = json.loads((out / "datalist.json").read_text())
    return [item for split in SPLITS for item in datalist[split]]


def _quiet_clusters(scan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan.cluster_annotations(verbose=False)


def _expected_crops(pl, patients) -> set[tuple[str, tuple[int, ...], int]]:
    """(series, annotation ids, slice index) for every nodule slice with an inclusion contour, from pylidc."""
    expected = set()
    for pid in patients:
        for scan in pl.query(pl.Scan).filter(pl.Scan.patient_id == pid):
            for cluster in _quiet_clusters(scan):
                assert len(cluster) <= 4, "cohort was chosen without oversized clusters"
                ids = tuple(sorted(a.id for a in cluster))
                for k in {c.image_k_position for a in cluster for c in a.contours if c.inclusion}:
                    expected.add((scan.series_instance_uid, ids, int(k)))
    return expected


def _lps_points(affine_ras: np.ndarray, size: int = 180) -> np.ndarray:
    """LPS mm of every crop voxel, as (3, size, size) indexed [axis, i=column, j=row]."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ras = affine_ras @ np.stack([i.ravel(), j.ravel(), np.zeros(i.size), np.ones(i.size)])
    lps = ras[:3] * np.array([[-1.0], [-1.0], [1.0]])
    return lps.reshape(3, size, size)


def _pixel_coords(lps: np.ndarray, header) -> tuple[np.ndarray, np.ndarray]:
    """Source (row, column) of LPS points, from the DICOM header alone."""
    ipp = np.array(header.ImagePositionPatient, dtype=float)
    iop = np.array(header.ImageOrientationPatient, dtype=float)
    spacing = np.array(header.PixelSpacing, dtype=float)
    offset = lps - ipp[:, None, None]
    column = np.tensordot(iop[:3], offset, axes=1) / spacing[1]
    row = np.tensordot(iop[3:], offset, axes=1) / spacing[0]
    return row, column


def _load(out: Path, relative: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(out / relative)
    return np.asarray(image.dataobj), image


# --------------------------------------------------------------------------------------------- format


def test_datalist_format_and_files(clean_run):
    datalist = json.loads((clean_run / "datalist.json").read_text())
    assert set(datalist) == set(SPLITS)
    items = _items(clean_run)
    assert items
    for item in items:
        for field in ("patient_id", "series_uid", "nodule_id", "annotation_ids", "slice_z", "num_annotators"):
            assert field in item
        assert isinstance(item["sop_instance_uid"], str) and item["sop_instance_uid"]
        assert not Path(item["source_file"]).is_absolute()
        assert len(item["pixel_spacing"]) == 2 and len(item["image_orientation"]) == 6
        assert isinstance(item["slice_thickness"], float)
        assert len(item["label"]) == 4
        assert item["num_annotators"] == len(item["annotation_ids"])
        assert item["annotation_ids"] == sorted(item["annotation_ids"])
        image, nifti = _load(clean_run, item["image"])
        assert not Path(item["image"]).is_absolute()
        assert image.shape == (180, 180, 1) and image.dtype == np.int16
        assert nifti.header.get_xyzt_units()[0] == "mm"
        assert int(nifti.header["sform_code"]) == 1 and int(nifti.header["qform_code"]) == 1
        for slot, path in enumerate(item["label"]):
            mask, mask_nifti = _load(clean_run, path)
            assert mask.shape == (180, 180, 1) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1}
            np.testing.assert_allclose(mask_nifti.affine, nifti.affine)
            if slot >= item["num_annotators"]:
                assert mask.sum() == 0, "slots beyond the nodule's readers must be empty"

    # Deterministic, sorted order within each split.
    for split in SPLITS:
        keys = [(i["patient_id"], i["series_uid"], i["nodule_id"], i["slice_index"]) for i in datalist[split]]
        assert keys == sorted(keys)

    summary = json.loads((clean_run / "summary.json").read_text())
    assert summary["counts"]["crops"] == len(items)
    assert summary["counts"]["crops_per_split"] == {s: len(datalist[s]) for s in SPLITS}
    with open(clean_run / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(items)
    assert {r["image"] for r in rows} == {i["image"] for i in items}


def test_split_is_by_patient_and_complete(clean_run):
    datalist = json.loads((clean_run / "datalist.json").read_text())
    owners = {}
    for split in SPLITS:
        for item in datalist[split]:
            assert owners.setdefault(item["patient_id"], split) == split, "a patient spans two splits"
    assert set(owners) == set(CLEAN_PATIENTS)
    # 6 patients: 4 / 1 / 1 (each split non-empty from three patients on).
    assert sorted(list(owners.values()).count(s) for s in SPLITS) == [1, 1, 4]
    # Both scans of the two-scan patient are present, under one split.
    scans = {i["series_uid"] for i in datalist[owners["LIDC-IDRI-0365"]] if i["patient_id"] == "LIDC-IDRI-0365"}
    assert len(scans) == 2


def test_writes_nothing_to_home(clean_run, lidc_home):
    assert list(lidc_home.iterdir()) == [], "the run wrote into HOME (pylidcrc or matplotlib cache?)"


# ------------------------------------------------------------------------------------- acceptance 1-3


def test_one_crop_per_nodule_slice_with_inclusion_contour(clean_run, pylidc_module):
    expected = _expected_crops(pylidc_module, CLEAN_PATIENTS)
    items = _items(clean_run)
    got = [(i["series_uid"], tuple(i["annotation_ids"]), i["slice_index"]) for i in items]
    assert len(got) == len(set(got))
    assert len(items) == len(expected)
    assert set(got) == expected
    assert {i["num_annotators"] for i in items} == {1, 2, 3, 4}


def test_masks_match_pylidc_boolean_mask(clean_run, clean_cohort, pylidc_module):
    pl = pylidc_module
    masks_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    checked = 0
    for item in _items(clean_run):
        _, nifti = _load(clean_run, item["image"])
        folder = next((clean_cohort / item["patient_id"]).rglob(item["series_uid"]))
        header = pydicom.dcmread(file_at_z(folder, item["slice_z"]), stop_before_pixels=True)
        row, column = _pixel_coords(_lps_points(nifti.affine), header)
        for slot, annotation_id in enumerate(item["annotation_ids"]):
            if annotation_id not in masks_cache:
                annotation = pl.query(pl.Annotation).filter(pl.Annotation.id == annotation_id).one()
                masks_cache[annotation_id] = (annotation.boolean_mask(), annotation.bbox_matrix())
            mask, bbox = masks_cache[annotation_id]
            full = np.zeros((512, 512), dtype=np.float32)
            k = item["slice_index"] - bbox[2, 0]
            if 0 <= k < mask.shape[2]:
                full[bbox[0, 0] : bbox[0, 1] + 1, bbox[1, 0] : bbox[1, 1] + 1] = mask[:, :, k]
            reference = map_coordinates(full, [row, column], order=1, mode="constant") >= 0.5
            got = _load(clean_run, item["label"][slot])[0][:, :, 0] > 0
            if max(reference.sum(), got.sum()) >= 20:
                dice = 2 * (reference & got).sum() / (reference.sum() + got.sum())
                assert dice >= 0.95, f"{item['image']} slot {slot}: Dice {dice:.3f}"
                checked += 1
    assert checked >= 40


@pytest.mark.slow
def test_crop_centre_lands_on_lesion_centre(clean_run, clean_cohort, pylidc_module):
    pl = pylidc_module
    series: dict[str, list[str]] = {}
    for item in _items(clean_run):
        uid = item["series_uid"]
        folder = next((clean_cohort / item["patient_id"]).rglob(uid))
        if uid not in series:
            # GDCM's own ordering of the series must be monotonic in z, like the DB's slice_zvals.
            series[uid] = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            zs = [float(pydicom.dcmread(n, stop_before_pixels=True).ImagePositionPatient[2]) for n in series[uid]]
            assert zs == sorted(zs) or zs == sorted(zs, reverse=True)
        name = str(file_at_z(folder, item["slice_z"]))
        assert name in series[uid]
        source = sitk.ReadImage(name)
        assert abs(source.GetOrigin()[2] - item["slice_z"]) < 1e-3

        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).one()
        points = [
            c.to_matrix(include_k=False)
            for a in scan.annotations
            if a.id in item["annotation_ids"]
            for c in a.contours
            if c.inclusion and c.image_k_position == item["slice_index"]
        ]
        points = np.vstack(points)
        row_c, col_c = (points.min(0) + points.max(0)) / 2.0
        lesion = np.array(source.TransformContinuousIndexToPhysicalPoint((float(col_c), float(row_c), 0.0)))

        crop = sitk.ReadImage(str(clean_run / item["image"]))
        centre = np.array(crop.TransformIndexToPhysicalPoint((90, 90, 0)))
        assert np.linalg.norm(centre - lesion) <= 0.5, item["image"]
        assert abs(centre[2] - source.GetOrigin()[2]) < 1e-3
        # nibabel's RAS affine is the same point with x and y negated.
        _, nifti = _load(clean_run, item["image"])
        ras = nifti.affine @ np.array([90, 90, 0, 1.0])
        np.testing.assert_allclose(ras[:3] * [-1, -1, 1], centre, atol=1e-4)
        np.testing.assert_allclose(np.abs(np.diag(nifti.affine)[:2]), [0.5, 0.5])


def test_image_is_the_resampled_slice_with_air_padding(clean_run, clean_cohort):
    padded = 0
    for item in _items(clean_run):
        image, nifti = _load(clean_run, item["image"])
        folder = next((clean_cohort / item["patient_id"]).rglob(item["series_uid"]))
        ds = pydicom.dcmread(file_at_z(folder, item["slice_z"]))
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row, column = _pixel_coords(_lps_points(nifti.affine), ds)
        inside = (row >= -0.5) & (row <= 511.5) & (column >= -0.5) & (column <= 511.5)
        reference = map_coordinates(hu, [row, column], order=1, mode="nearest")
        got = image[:, :, 0].astype(np.float32)
        assert np.abs(got[inside] - reference[inside]).max() <= 1.0
        assert (got[~inside] == -1024).all()
        if (~inside).any():
            padded += 1
            assert item["outside_fraction"] == pytest.approx((~inside).mean(), abs=1e-6)
            for path in item["label"]:
                assert _load(clean_run, path)[0][:, :, 0][~inside].sum() == 0
    summary = json.loads((clean_run / "summary.json").read_text())
    # LIDC-IDRI-0983's nodule sits near the border: its crops are padded, listed, and nothing crashed.
    assert padded >= 1
    assert summary["counts"]["border_crops"] == padded
    assert {b["patient_id"] for b in summary["border_crops"]} == {"LIDC-IDRI-0983"}


# ------------------------------------------------------------------------------------ acceptance 4


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, bad_cohort, lidc_home):
    from preprocessing.lidc import run

    out = tmp_path_factory.mktemp("lidc_out_bad")
    patients = [
        "LIDC-IDRI-0611",
        "LIDC-IDRI-0719",
        "LIDC-IDRI-0937",
        "LIDC-IDRI-0957",
        "LIDC-IDRI-0983",
        "LIDC-IDRI-9999",
    ]
    summary = run(bad_cohort["root"], out, workers=2, patients=patients, progress=False)
    return out, summary


def _skips(summary, **match) -> list[dict]:
    return [s for s in summary["skipped"] if all(s.get(k) == v for k, v in match.items())]


def test_bad_input_is_logged_not_fatal(bad_run, bad_cohort, pylidc_module, clean_run):
    out, summary = bad_run
    broken = bad_cohort["broken"]
    items = _items(out)
    assert json.loads((out / "summary.json").read_text()) == summary
    missing = "missing slice: no readable DICOM file at this z"

    # Truncated inside the pixel data: the header is whole, the pixel data's items run past the end of the file;
    # the file is ignored and that slice's crops are skipped, naming it.
    path, z = broken["truncated_pixels"]
    [entry] = _skips(summary, level="file", path=path)
    assert entry["reason"] == "pixel data cut short"
    assert entry["detail"].startswith("encapsulated pixel data: item ")
    [lost] = _skips(summary, level="slice", patient_id="LIDC-IDRI-0957", slice_z=z)
    assert lost["reason"] == "missing slice: its file's pixel data is cut short" and lost["detail"] == path
    # The same damage on a slice no crop needs (only its header is read there): found by the pixel-data check,
    # listed as ignored, not counted as used.
    path, z = broken["truncated_pixels_unused"]
    [entry] = _skips(summary, level="file", path=path)
    assert entry["reason"] == "pixel data cut short" and entry["slice_z"] == pytest.approx(z)
    assert not _skips(summary, level="slice", patient_id="LIDC-IDRI-0957", slice_z=z)
    # Cut at 300 bytes, inside the file meta: no UIDs left, so the file is unusable and its slice is missing.
    path, z = broken["truncated_header"]
    assert _skips(summary, level="file", path=path, reason="DICOM file without Study/Series Instance UID")
    [lost] = _skips(summary, level="slice", patient_id="LIDC-IDRI-0957", slice_z=z)
    assert lost["reason"] == missing
    assert lost["detail"].startswith("3 file(s) under the patient folder could not be placed at any z: ")
    assert path in lost["detail"], "the lost slice names the file that could be it"
    # Cut right before ImagePositionPatient: it parses with its UIDs but cannot be placed.
    path, z = broken["header_without_geometry"]
    [entry] = _skips(summary, level="file", path=path)
    assert entry["reason"] == "missing geometry: DICOM header cut short"
    assert entry["detail"].startswith("missing ImagePositionPatient, PixelSpacing, Rows, Columns")
    [lost] = _skips(summary, level="slice", patient_id="LIDC-IDRI-0957", slice_z=z)
    assert lost["reason"] == missing and path in lost["detail"], "the lost slice names the file that could be it"
    # Cut inside its SeriesInstanceUID: it parses under a mangled UID, and is still named, not just counted.
    path, z = broken["series_uid_cut"]
    [entry] = _skips(summary, level="file", path=path)
    assert entry["reason"] == "missing geometry: DICOM header cut short"
    [lost] = _skips(summary, level="slice", patient_id="LIDC-IDRI-0957", slice_z=z)
    assert lost["reason"] == missing and path in lost["detail"]
    # Non-DICOM files in the series folder.
    for path in broken["non_dicom"]:
        assert _skips(summary, level="file", path=path, reason="not a DICOM file")
    # A duplicated slice: the copy is ignored, the original is cropped.
    duplicate, original, z = broken["duplicate"]
    [entry] = _skips(summary, level="file", path=duplicate)
    assert entry["reason"] == "duplicate slice position: another file of the series has this z"
    assert entry["detail"] == f"kept {original} (a copy: same SOPInstanceUID)"
    at_z = [i for i in items if i["patient_id"] == "LIDC-IDRI-0983" and abs(i["slice_z"] - z) < 1e-3]
    assert at_z and {i["source_file"] for i in at_z} == {original}
    # One slice of another orientation: dropped with its values, its crops skipped, never cut on a wrong grid.
    path, z = broken["other_orientation"]
    [entry] = _skips(summary, level="file", path=path)
    assert entry["reason"] == "other orientation than the rest of the series"
    assert entry["detail"] == "ImageOrientationPatient [1, 0, 0, 0, 0, -1], series [1, 0, 0, 0, 1, 0]"
    [lost] = _skips(summary, level="slice", patient_id="LIDC-IDRI-0983", slice_z=z)
    assert lost["reason"] == "slice dropped: its file has another orientation or PixelSpacing than the series"
    # A series that is not in the DB.
    assert _skips(summary, level="scan", series_uid=broken["absent_series"], reason="series not in the annotation DB")
    # A deleted slice.
    assert _skips(summary, level="slice", patient_id="LIDC-IDRI-0611", slice_z=broken["missing_slice"], reason=missing)
    # A scan without annotations.
    assert _skips(summary, level="scan", series_uid=broken["no_annotations"], reason="no annotations in the DB")
    # A patient that is not under the root.
    assert _skips(summary, level="patient", patient_id="LIDC-IDRI-9999")

    # Everything else is produced exactly as in the clean run.
    bad_zs = {
        ("LIDC-IDRI-0957", broken["truncated_pixels"][1]),
        ("LIDC-IDRI-0957", broken["truncated_header"][1]),
        ("LIDC-IDRI-0957", broken["header_without_geometry"][1]),
        ("LIDC-IDRI-0611", broken["missing_slice"]),
        ("LIDC-IDRI-0957", broken["series_uid_cut"][1]),
        ("LIDC-IDRI-0983", broken["other_orientation"][1]),
    }
    clean = {
        (i["series_uid"], i["nodule_id"], i["slice_index"])
        for i in _items(clean_run)
        if i["patient_id"] in {"LIDC-IDRI-0611", "LIDC-IDRI-0719", "LIDC-IDRI-0957", "LIDC-IDRI-0983"}
        and (i["patient_id"], i["slice_z"]) not in bad_zs
    }
    assert len(clean) == 8  # of the 14 crops of these patients in the clean run, 6 lie on a damaged slice
    assert {(i["series_uid"], i["nodule_id"], i["slice_index"]) for i in items} == clean
    assert not any(i["patient_id"] == NO_ANNOTATION_PATIENT for i in items)

    # No partial outputs: every file on disk is referenced, every referenced file exists.
    written = {p.relative_to(out).as_posix() for p in (out / "patients").rglob("*.nii.gz")}
    referenced = {p for i in items for p in [i["image"], *i["label"]]}
    assert written == referenced
    assert not list((out / "patients").glob(".staging-*"))


def _files_on_disk(root: Path) -> list[str]:
    return sorted(
        Path(os.path.relpath(os.path.join(d, n), root)).as_posix() for d, _, names in os.walk(root) for n in names
    )


def test_every_file_under_the_root_is_accounted_for(bad_run, bad_cohort, pylidc_module):
    out, summary = bad_run
    root, broken = bad_cohort["root"], bad_cohort["broken"]
    on_disk = _files_on_disk(root)
    files = summary["files"]
    assert files["found"] == len(on_disk)
    assert files["used"] + files["ignored"] == files["found"]
    assert sum(files["ignored_by_reason"].values()) == files["ignored"]

    pl = pylidc_module
    slices = {
        pid: sum(len(scan.slice_zvals) for scan in pl.query(pl.Scan).filter(pl.Scan.patient_id == pid))
        for pid in ("LIDC-IDRI-0611", "LIDC-IDRI-0719", "LIDC-IDRI-0957", "LIDC-IDRI-0983", NO_ANNOTATION_PATIENT)
    }
    annotated = sum(n for pid, n in slices.items() if pid != NO_ANNOTATION_PATIENT)
    assert files["ignored_by_reason"] == {
        "DICOM file without Study/Series Instance UID": 1,
        "duplicate slice position: another file of the series has this z": 1,
        "missing geometry: DICOM header cut short": 2,
        "not a DICOM file": 2,
        "other orientation than the rest of the series": 1,
        "other series: not in the annotation DB": 3,
        "outside any LIDC-IDRI-dddd patient folder": 1,
        "pixel data cut short": 2,
        "scan skipped: no annotations in the DB": slices[NO_ANNOTATION_PATIENT],
    }
    # Every DB slice of the annotated scans is used, except the deleted one and the six damaged ones.
    assert files["used"] == annotated - 7
    # One file deleted; a duplicate, two non-DICOM files, a 3-file foreign series and a README added.
    assert files["found"] == annotated + slices[NO_ANNOTATION_PATIENT] - 1 + 1 + 2 + 3 + 1

    # Each patient's record names every ignored file of its folder with its reason.
    ignored = {}
    for record in (out / "patients").glob("*/record.json"):
        ignored.update(json.loads(record.read_text())["ignored_files"])
    assert set(ignored) | {broken["outside"]} <= set(on_disk)
    assert len(ignored) + 1 == files["ignored"]
    assert ignored[broken["duplicate"][0]].startswith("duplicate slice position")
    assert ignored[broken["other_orientation"][0]] == "other orientation than the rest of the series"
    assert ignored[broken["truncated_pixels_unused"][0]] == "pixel data cut short"


def test_unselected_patients_are_counted(tmp_path, bad_cohort, lidc_home):
    from preprocessing.lidc import run

    root = bad_cohort["root"]
    summary = run(root, tmp_path / "out", patients=["LIDC-IDRI-0719"], progress=False)
    on_disk = _files_on_disk(root)
    others = [p for p in on_disk if p.startswith("LIDC-IDRI-") and not p.startswith("LIDC-IDRI-0719/")]
    files = summary["files"]
    assert files["found"] == len(on_disk)
    assert files["ignored_by_reason"] == {
        "outside any LIDC-IDRI-dddd patient folder": 1,
        "patient not selected (--patients)": len(others),
    }
    assert files["used"] == len(on_disk) - len(others) - 1


def test_crops_trace_to_their_source_instance(clean_run, clean_cohort, bad_run, bad_cohort, pylidc_module):
    """Every crop names the DICOM instance it was cut from: the file at its slice, with that SOPInstanceUID."""
    pl = pylidc_module
    with open(clean_run / "manifest.csv", newline="") as handle:
        rows = {r["image"]: r for r in csv.DictReader(handle)}
    for out, root in ((clean_run, clean_cohort), (bad_run[0], bad_cohort["root"])):
        seen: dict[tuple[str, int], str] = {}
        for item in _items(out):
            text = json.dumps(item)
            assert str(root) not in text and str(out) not in text, "no absolute paths in the per-item data"
            path = root / item["source_file"]
            folder = next((root / item["patient_id"]).rglob(item["series_uid"]))
            assert path == file_at_z(folder, item["slice_z"]), item["image"]
            header = pydicom.dcmread(path, stop_before_pixels=True)
            assert item["sop_instance_uid"] == header.SOPInstanceUID
            assert item["pixel_spacing"] == [float(v) for v in header.PixelSpacing]
            assert item["image_orientation"] == [float(v) for v in header.ImageOrientationPatient]
            assert item["slice_thickness"] == float(header.SliceThickness)
            scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == item["series_uid"]).one()
            assert item["slice_thickness"] == pytest.approx(scan.slice_thickness)
            assert item["pixel_spacing"] == pytest.approx([scan.pixel_spacing] * 2)
            # crops of one slice (several nodules) share the instance; different slices never do
            key = (item["series_uid"], item["slice_index"])
            assert seen.setdefault(key, item["sop_instance_uid"]) == item["sop_instance_uid"]
            if out == clean_run:
                row = rows[item["image"]]
                assert (row["sop_instance_uid"], row["source_file"]) == (item["sop_instance_uid"], item["source_file"])
                assert [float(v) for v in row["image_orientation"].split(";")] == item["image_orientation"]
        assert len(set(seen.values())) == len(seen)


# ------------------------------------------------------------------------------------------- report


def test_report_of_a_finished_run(clean_run, bad_run, capsys):
    from preprocessing.lidc import format_report, main

    before = sorted(p.relative_to(clean_run) for p in clean_run.rglob("*"))
    assert main(["--report", str(clean_run)]) == 0
    text = capsys.readouterr().out
    assert sorted(p.relative_to(clean_run) for p in clean_run.rglob("*")) == before, "--report writes nothing"
    summary = json.loads((clean_run / "summary.json").read_text())
    counts = summary["counts"]
    lines = text.splitlines()
    assert lines[0] == f"LIDC preprocessing report: {clean_run}"
    assert lines[2].split() == ["training", "validation", "test", "total"]
    table = {line.split()[0]: line.split()[1:] for line in lines[3:6]}
    crops = [str(counts["crops_per_split"][s]) for s in SPLITS] + [str(counts["crops"])]
    assert table["crops"] == crops
    assert table["patients"][-1] == str(len(CLEAN_PATIENTS))
    assert table["scans"][-1] == "7"  # six patients, one with two scans
    files = summary["files"]
    assert f"files under --dicom-root: {files['found']} found = {files['found']} used + 0 ignored" in lines
    assert "patients seen: 6 (0 without crops)" in lines

    bad = format_report(bad_run[1]).splitlines()
    assert "       2  not a DICOM file" in bad
    assert "       2  file: not a DICOM file" in bad
    assert "       1  file: other orientation than the rest of the series" in bad
    assert "patients seen: 6 (2 without crops)" in bad  # 0937 has no annotations, 9999 no folder


def test_report_errors(tmp_path, capsys):
    from preprocessing.lidc import main

    assert main(["--report", str(tmp_path)]) == 2
    assert "summary.json' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "--dicom-root, --output-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--report", str(tmp_path), "--dicom-root", str(tmp_path)])
    assert "takes no --dicom-root" in capsys.readouterr().err


def test_slice_location_filter(tmp_path, clean_cohort, pylidc_module, lidc_home):
    from preprocessing.lidc import run

    root = tmp_path / "dicom"
    shutil.copytree(clean_cohort / "LIDC-IDRI-0611", root / "LIDC-IDRI-0611")
    z = needed_zs(pylidc_module, "LIDC-IDRI-0611")[-1]
    path = file_at_z(series_dir(root, "LIDC-IDRI-0611"), z)
    ds = pydicom.dcmread(path)
    ds.SliceLocation = z + 7.5
    ds.save_as(path)

    unfiltered = run(root, tmp_path / "plain", progress=False)
    filtered = run(root, tmp_path / "filtered", slice_location_filter=True, progress=False)
    assert filtered["counts"]["crops"] == unfiltered["counts"]["crops"] - 1
    assert _skips(filtered, level="slice", slice_z=z, reason="slice dropped by the SliceLocation filter")
    assert [s for s in filtered["skipped"] if s["level"] == "file" and s["reason"].startswith("SliceLocation filter")]
    assert not _skips(unfiltered, level="slice")


# ------------------------------------------------------------------------------------ acceptance 5


@pytest.mark.slow
def test_killed_run_resumes_to_identical_outputs(tmp_path, clean_cohort, clean_run, lidc_home):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HOME=str(lidc_home))
    command = [
        sys.executable,
        "-m",
        "preprocessing.lidc",
        "--dicom-root",
        str(clean_cohort),
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("patients/*/record.json")):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no patient finished within 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    done = list(out.glob("patients/*/record.json"))
    assert 1 <= len(done) < len(CLEAN_PATIENTS), "the kill should land mid-run"
    assert not (out / "datalist.json").exists()

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(CLEAN_PATIENTS) - len(done)} to process" in rerun.stderr
    for name in ("datalist.json", "manifest.csv", "summary.json"):
        assert (out / name).read_bytes() == (clean_run / name).read_bytes(), name
    assert not list((out / "patients").glob(".staging-*"))
    # Crops are byte-identical too (deterministic gzip).
    item = _items(out)[0]
    assert (out / item["image"]).read_bytes() == (clean_run / item["image"]).read_bytes()
