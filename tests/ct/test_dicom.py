"""car_med.ct.dicom: one file's header placed as a slice or skipped with its reason, the pixel-data check
(whole, cut short, native and encapsulated, without decoding), HU decoding and the slice at a z."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import ORIGIN, RESCALE_INTERCEPT, SERIES_UID, STUDY_UID, stored_pixels, write_slice
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from car_med.ct.dicom import (
    HEADER_CUT_SHORT,
    PIXELS_CUT_SHORT,
    decode_hu,
    nearest_slice,
    pixel_data_problem,
    read_file_header,
)


def _problem(path: Path) -> str | None:
    with open(path, "rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
        return pixel_data_problem(handle, ds, os.path.getsize(path))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
def test_whole_pixel_data_passes_and_any_cut_is_found(tmp_path, syntax):
    path = write_slice(tmp_path / "slice.dcm", syntax=syntax)
    assert _problem(path) is None
    data = path.read_bytes()
    element_header = 8 if syntax == ImplicitVRLittleEndian else 12  # tag, (VR, reserved,) length
    header_end = len(data) - 16 * 16 * 2 - element_header
    for cut in (1, 2, 7, 100):
        path.write_bytes(data[:-cut])
        problem = _problem(path)
        assert problem is not None, f"a cut of {cut} bytes went unnoticed"
        if syntax == RLELossless:
            assert problem.startswith("encapsulated pixel data:")
        else:
            assert "the file holds" in problem
    if syntax != RLELossless:
        path.write_bytes(data[:header_end])  # the file ends with the header
        assert _problem(path) == "the header ends the file: no pixel data follows"
        path.write_bytes(data[: header_end + element_header])  # the element's header, no value
        assert _problem(path) == "the pixel data element declares 512 bytes, the file holds 0 after its header"


def test_native_pixel_data_shorter_than_the_header_says_is_found(tmp_path):
    path = write_slice(tmp_path / "slice.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = 20  # the element still holds 16 rows
    ds.save_as(path)
    assert _problem(path) == "the pixel data element holds 512 bytes, the header's image size needs 640"


def test_a_whole_slice_is_placed_with_the_header_values_as_written(tmp_path):
    path = write_slice(tmp_path / "s" / "a.dcm", z=-12.5, pixel_spacing=(0.6, 0.8), instance_number=7)
    header = read_file_header(path, "s/a.dcm", "P")
    assert (header.study_uid, header.series_uid, header.modality, header.dicom_patient_id) == (
        STUDY_UID,
        SERIES_UID,
        "CT",
        "PAT-1",
    )
    assert header.skip is None
    placed = header.slice
    assert (placed.path, placed.relative_path, placed.z, placed.instance_number) == (str(path), "s/a.dcm", -12.5, 7)
    assert placed.slice_location == -12.5 and placed.pixel_spacing == [0.6, 0.8]
    assert placed.orientation == [1, 0, 0, 0, 1, 0] and placed.geometry.shape == (16, 16)
    np.testing.assert_array_equal(placed.geometry.position, [*ORIGIN, -12.5])


def test_a_file_that_is_no_slice_gets_its_reason_and_keeps_or_loses_its_series(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(os.urandom(2048))
    header = read_file_header(junk, "junk.dcm", "P")
    assert header.series_uid == "" and header.slice is None
    assert (header.skip.level, header.skip.reason, header.skip.path) == ("file", "not a DICOM file", "junk.dcm")

    scout = write_slice(tmp_path / "scout.dcm")
    ds = pydicom.dcmread(scout)
    del ds.ImagePositionPatient
    ds.save_as(scout)
    header = read_file_header(scout, "scout.dcm", "P")
    assert header.series_uid == SERIES_UID and header.slice is None  # a file of the series, but no slice
    assert header.skip.reason == "missing geometry: not an image slice"
    assert header.skip.detail == "missing ImagePositionPatient"

    malformed = write_slice(tmp_path / "malformed.dcm")
    ds = pydicom.dcmread(malformed)
    ds.PixelSpacing = [0.7, 0.7, 0.7]
    ds.save_as(malformed)
    header = read_file_header(malformed, "malformed.dcm", "P")
    assert header.skip.reason == "DICOM header with malformed geometry tags"
    assert "PixelSpacing has 3 values, expected 2" in header.skip.detail


def test_a_cut_header_or_cut_pixels_are_named_with_the_slice_z_where_known(tmp_path):
    path = write_slice(tmp_path / "cut.dcm", z=5.0, syntax=RLELossless)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    header = read_file_header(path, "cut.dcm", "P")
    assert (header.skip.reason, header.skip.slice_z, header.skip.series_uid) == (PIXELS_CUT_SHORT, 5.0, SERIES_UID)
    # cut right before ImagePositionPatient (0020,0032): the UIDs are there, the geometry never came
    path.write_bytes(data[: data.find(b"\x20\x00\x32\x00DS")])
    header = read_file_header(path, "cut.dcm", "P")
    assert header.skip.reason == HEADER_CUT_SHORT and "missing ImagePositionPatient" in header.skip.detail


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_decode_hu_applies_the_rescale_to_the_stored_values(tmp_path, syntax):
    path = write_slice(tmp_path / "slice.dcm", z=2.5, syntax=syntax)
    hu = decode_hu(read_file_header(path, "slice.dcm", "P").slice)
    assert hu.dtype == np.float32 and hu.shape == (16, 16)
    np.testing.assert_array_equal(hu, stored_pixels(2.5).astype(np.float32) + RESCALE_INTERCEPT)


def test_nearest_slice_takes_the_slice_within_a_hundredth_of_a_millimetre(tmp_path):
    slices = [read_file_header(write_slice(tmp_path / f"{k}.dcm", z=2.5 * k), f"{k}.dcm", "P").slice for k in range(3)]
    assert nearest_slice(slices, 5.004).z == 5.0
    assert nearest_slice(slices, 5.02) is None and nearest_slice([], 0.0) is None
