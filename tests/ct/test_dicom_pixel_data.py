"""The pixel-data check of car_med.ct.dicom: whole, cut short, native and encapsulated, without decoding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from car_med.ct import PIXELS_CUT_SHORT, pixel_data_problem, read_series_headers


def _slice(path: Path, syntax: str, z: float = 0.0, rows: int = 16) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.Modality = "CT"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows, ds.Columns = rows, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(rows * 16, dtype=np.uint16).reshape(rows, 16) * 7) % 4096
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return path


def _problem(path: Path) -> str | None:
    with open(path, "rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
        return pixel_data_problem(handle, ds, os.path.getsize(path))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
def test_whole_pixel_data_passes_and_any_cut_is_found(tmp_path, syntax):
    path = _slice(tmp_path / "slice.dcm", syntax)
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
    path = _slice(tmp_path / "slice.dcm", ExplicitVRLittleEndian)
    ds = pydicom.dcmread(path)
    ds.Rows = 20  # the element still holds 16 rows
    ds.save_as(path)
    assert _problem(path) == "the pixel data element holds 512 bytes, the header's image size needs 640"


def test_a_cut_slice_is_ignored_with_its_reason_and_z_and_every_file_is_accounted_for(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    paths = [_slice(folder / f"{k}.dcm", RLELossless, z=2.5 * k) for k in range(4)]
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-5])
    series, skips, found = read_series_headers(folder, tmp_path, "P")
    [files] = series.values()
    assert [s.z for s in files.slices] == [0.0, 2.5, 7.5]
    [cut] = files.incomplete
    assert (cut.reason, cut.path, cut.slice_z) == (PIXELS_CUT_SHORT, "series/2.dcm", 5.0)
    assert len(found) == len(files.slices) + len(files.incomplete) + len(skips) == 4
