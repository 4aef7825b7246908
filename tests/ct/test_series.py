"""car_med.ct.series: open_series, the one way a folder of DICOM files becomes series, and who goes through it.

The series are written here with pydicom (tests/ct/dicom_files.py); the callers' test runs prediction's reader,
the volume reader and LIDC preprocessing with ``open_series`` wrapped where each caller looks it up.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import SERIES_UID, write_series, write_slice
from pydicom.uid import RLELossless

from car_med.ct.dicom import PIXELS_CUT_SHORT, DicomSlice
from car_med.ct.geometry import SliceGeometry
from car_med.ct.series import consistent_slices, open_series, slice_by_z

REPOSITORY = Path(__file__).resolve().parents[2]


def _slice(z: float, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.7)) -> DicomSlice:
    geometry = SliceGeometry(
        position=np.array([-170.0, -160.0, z]),
        row_cosine=np.array(orientation[:3], dtype=float),
        column_cosine=np.array(orientation[3:], dtype=float),
        row_spacing=spacing[0],
        column_spacing=spacing[1],
        slice_spacing=0.0,
        shape=(512, 512),
    )
    name = f"P/s/{int(z * 10):04d}.dcm"
    return DicomSlice(f"/abs/{name}", z, 1, z, geometry, relative_path=name, sop_instance_uid=f"1.2.{int(z * 10)}")


def test_consistent_slices_drops_the_minority_orientation_and_spacing():
    axial = [_slice(2.5 * k) for k in range(6)]
    coronal = _slice(15.0, orientation=(1, 0, 0, 0, 0, -1))
    coarse = _slice(17.5, spacing=(0.7, 0.8))
    kept, skips, refusal = consistent_slices([coarse, *axial, coronal], "P", "1.2")
    assert refusal is None
    assert [s.z for s in kept] == [2.5 * k for k in range(6)]
    assert [(s.path, s.reason, s.slice_z) for s in skips] == [
        ("P/s/0150.dcm", "other orientation than the rest of the series", 15.0),
        ("P/s/0175.dcm", "other PixelSpacing than the rest of the series", 17.5),
    ]
    assert skips[1].detail == "PixelSpacing [0.7, 0.8], series [0.7, 0.7]"
    # Within the tolerances a slice belongs to the series (DS strings round differently).
    close = _slice(20.0, orientation=(1, 0, 0, 0, 1 - 2e-5, 1e-5), spacing=(0.7004, 0.7))
    kept, skips, _ = consistent_slices([*axial, close], "P", "1.2")
    assert len(kept) == 7 and skips == []


def test_consistent_slices_refuses_a_series_without_majority_or_oblique():
    half = [_slice(2.5 * k) for k in range(3)] + [_slice(10 + 2.5 * k, spacing=(0.8, 0.8)) for k in range(3)]
    kept, skips, refusal = consistent_slices(half, "P", "1.2")
    assert kept == [] and skips == []
    assert refusal.level == "scan"
    assert refusal.reason == "slices disagree on orientation or PixelSpacing, none in the majority; not cropped"
    assert "3 slice(s) with orientation [1, 0, 0, 0, 1, 0], PixelSpacing [0.8, 0.8]" in refusal.detail

    def tilted(degrees: float) -> list[DicomSlice]:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        return [_slice(2.5 * k, orientation=(1, 0, 0, 0, c, s)) for k in range(4)]

    kept, _, refusal = consistent_slices(tilted(5.0), "P", "1.2")
    assert kept == [] and refusal.reason == "oblique series: slice normal is not along z; not cropped"
    assert refusal.detail.endswith("normal 5.00 deg from z")
    kept, _, refusal = consistent_slices(tilted(0.5), "P", "1.2")
    assert refusal is None and len(kept) == 4


def test_slice_by_z_keeps_the_lowest_instance_number_and_filters_on_slice_location():
    first, copy, other = _slice(5.0), _slice(5.0), _slice(0.0)
    copy = DicomSlice(copy.path, 5.0, 0, 5.0, copy.geometry, relative_path="P/s/copy.dcm", sop_instance_uid="9")
    unique, skips = slice_by_z([first, copy, other], "P", "1.2", slice_location_filter=False)
    assert [(s.z, s.relative_path) for s in unique] == [(0.0, "P/s/0000.dcm"), (5.0, "P/s/copy.dcm")]
    [duplicate] = skips
    assert duplicate.path == "P/s/0050.dcm" and duplicate.detail == "kept P/s/copy.dcm (lower InstanceNumber kept)"
    moved = DicomSlice(other.path, 0.0, 1, 3.0, other.geometry, relative_path="P/s/moved.dcm")
    unique, skips = slice_by_z([first, moved], "P", "1.2", slice_location_filter=True)
    assert [s.z for s in unique] == [5.0]
    assert skips[0].reason == "SliceLocation filter: |SliceLocation| != |ImagePositionPatient z|"


def test_open_series_keeps_one_consistent_slice_per_z_sorted_and_reports_every_other_file(tmp_path):
    folder = tmp_path / "patient"
    write_series(folder / "a", [5.0, 0.0, 7.5, 2.5])
    shutil.copyfile(folder / "a" / "z0025.dcm", folder / "a" / "z0025_copy.dcm")  # a byte copy: same SOP UID
    write_slice(folder / "a" / "coronal.dcm", z=10.0, orientation=(1, 0, 0, 0, 0, -1))
    cut = write_slice(folder / "a" / "cut.dcm", z=12.5, syntax=RLELossless)
    cut.write_bytes(cut.read_bytes()[:-5])
    (folder / "notes.txt").write_text("not DICOM\n")
    write_series(folder / "b", [0.0], series_uid="1.2.3.5")

    opened = open_series(folder, root=tmp_path, patient_id="P")
    assert [s.series_uid for s in opened.series] == [SERIES_UID, "1.2.3.5"]
    series = opened.series[0]
    assert [s.z for s in series.slices] == [0.0, 2.5, 5.0, 7.5]
    assert series.image_files == 6 and series.dicom_patient_id == "PAT-1"
    report = series.report
    assert [(s.reason, s.path, s.slice_z) for s in report.incomplete] == [(PIXELS_CUT_SHORT, "patient/a/cut.dcm", 12.5)]
    assert [s.path for s in report.other_geometry] == ["patient/a/coronal.dcm"]
    assert [(s.path, s.detail) for s in report.duplicates] == [
        ("patient/a/z0025_copy.dcm", "kept patient/a/z0025.dcm (a copy: same SOPInstanceUID)")
    ]
    assert report.refusal is None and report.location_filtered == ()
    assert [(s.reason, s.patient_id) for s in opened.unreadable] == [("not a DICOM file", "P")]
    # every file found is a slice, a skip of its series, or a file of no series
    placed = [s.relative_path for series in opened.series for s in series.slices]
    skipped = [s.path for series in opened.series for s in (*series.report.incomplete, *series.report.other_geometry)]
    skipped += [s.path for series in opened.series for s in series.report.duplicates] + ["patient/notes.txt"]
    assert sorted(placed + skipped) == sorted(opened.found) and len(opened.found) == 9
    assert sorted(opened.found) == sorted(f for series in opened.series for f in series.files) + ["patient/notes.txt"]


def test_whole_series_refuses_a_series_that_lost_a_file_naming_the_file(tmp_path):
    write_series(tmp_path, [0.0, 2.5, 5.0])
    cut = write_slice(tmp_path / "cut.dcm", z=7.5, syntax=RLELossless)
    cut.write_bytes(cut.read_bytes()[:-5])
    with pytest.raises(ValueError, match=rf"cut\.dcm: {PIXELS_CUT_SHORT} \(encapsulated .*series {SERIES_UID} cannot"):
        open_series(tmp_path).whole_series(SERIES_UID)
    cut.unlink()
    for path in tmp_path.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.save_as(path)
    with pytest.raises(ValueError, match=r"oblique series: slice normal is not along z"):
        open_series(tmp_path, SERIES_UID).whole_series(SERIES_UID)


def test_a_missing_folder_or_series_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"DICOM folder .*nowhere does not exist or is not a folder"):
        open_series(tmp_path / "nowhere")
    write_series(tmp_path, [0.0, 2.5])
    with pytest.raises(ValueError, match=rf"holds no DICOM series 9\.9; it holds: {SERIES_UID} \(2 image files\)"):
        open_series(tmp_path, "9.9")


@pytest.fixture
def open_series_calls(monkeypatch) -> list[tuple[str, Path]]:
    """``(caller module, folder)`` of every call of open_series by prediction, the volume reader and LIDC
    preprocessing; the real open_series does the work."""
    calls: list[tuple[str, Path]] = []

    def recording(caller: str):
        def wrapper(folder, *args, **kwargs):
            calls.append((caller, Path(folder)))
            return open_series(folder, *args, **kwargs)

        return wrapper

    for caller in ("car_med.predict", "car_med.ct.volume", "preprocessing.lidc"):
        monkeypatch.setattr(f"{caller}.open_series", recording(caller))
    return calls


def test_prediction_opens_its_series_once_and_builds_the_volume_from_it(tmp_path, open_series_calls):
    from car_med.predict import read_prediction_inputs

    folder = tmp_path / "ct"
    write_series(folder, [0.0, 2.5, 5.0, 7.5, 10.0])
    nodules = tmp_path / "nodules.csv"
    nodules.write_text("nodule_id,x,y,z,diameter_mm\nA,0.0,-3.0,5.0,4\n")
    ct, _ = read_prediction_inputs(dicom=folder, image=None, nodules_csv=nodules, roi=None)
    volume = ct.whole_volume()
    assert volume.shape == (16, 16, 5) and ct.patient_id == "PAT-1"
    assert open_series_calls == [("car_med.predict", folder)]  # the volume is not read by a second scan


def test_the_volume_reader_opens_through_open_series(tmp_path, open_series_calls):
    from car_med.ct.volume import read_ct_series

    write_series(tmp_path, [0.0, 2.5, 5.0])
    assert read_ct_series(tmp_path, SERIES_UID).shape == (16, 16, 3)
    assert open_series_calls == [("car_med.ct.volume", tmp_path)]


def test_preprocessing_opens_each_patient_folder_once_through_open_series(
    tmp_path, clean_cohort, lidc_home, open_series_calls
):
    from preprocessing.lidc import process_patient

    patient = "LIDC-IDRI-0611"
    record = process_patient(patient, clean_cohort / patient, clean_cohort, tmp_path)
    assert record["items"] and record["files"]["used"] > 0
    assert open_series_calls == [("preprocessing.lidc", clean_cohort / patient)]


def test_only_open_series_reads_the_headers_of_a_folder():
    """No second reader of DICOM folders: ``read_file_header`` is called in car_med/ct/series.py only, and no
    module outside car_med/ct reads DICOM files with pydicom."""
    callers, dcmread = set(), set()
    for path in sorted([*(REPOSITORY / "car_med").rglob("*.py"), *(REPOSITORY / "preprocessing").rglob("*.py")]):
        module = path.relative_to(REPOSITORY).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name == "read_file_header":
                    callers.add(module)
                if name == "dcmread" and not module.startswith("car_med/ct/"):
                    dcmread.add(module)
    assert callers == {"car_med/ct/series.py"}
    assert dcmread == set(), f"modules that read DICOM files beside car_med.ct: {sorted(dcmread)}"
