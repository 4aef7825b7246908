"""CT input for the whole project: where a CT is read and where a crop is cut.

- :mod:`car_med.ct.dicom`: one DICOM file: its header without pixel data, a pixel-data check, HU decoding.
- :mod:`car_med.ct.series`: :func:`open_series`, the one way a folder of DICOM files becomes series: consistent
  slices, one per z, sorted by z, and a report of every file left out and why.
- :mod:`car_med.ct.geometry`: the 0.5 mm crop grid of a slice, resampling onto it, its scanner-frame affine.
- :mod:`car_med.ct.volume`: a whole series as one volume, and crop-grid maps pasted back onto it.
- :mod:`car_med.ct.nifti`: a CT volume from NIfTI, and crops as NIfTI files.
- :mod:`car_med.ct.roi`: nodule regions (a NIfTI label map or a DICOM SEG) on a CT's voxel grid.

Preprocessing, the review export and prediction all open, read and cut through these functions, so a crop cut
for training and one cut for a new patient at the same centre are the same voxels.
"""

from __future__ import annotations

from car_med.ct.dicom import (
    HEADER_CUT_SHORT,
    PIXELS_CUT_SHORT,
    DicomSlice,
    FileHeader,
    Skip,
    decode_hu,
    nearest_slice,
    pixel_data_problem,
    read_file_header,
    walk_files,
)
from car_med.ct.geometry import (
    AIR_HU,
    CROP_SIZE,
    LPS_TO_RAS,
    TARGET_SPACING_MM,
    CropGrid,
    SliceGeometry,
    crop_grid,
    lps_to_pixel,
    resample_image,
    resample_mask,
)
from car_med.ct.nifti import read_nifti_ct, write_crop_nifti
from car_med.ct.roi import read_nodule_roi
from car_med.ct.series import DicomSeries, SeriesFolder, SeriesReport, consistent_slices, open_series, slice_by_z
from car_med.ct.volume import CTSeries, PastedPlane, paste_plane, read_ct_series, series_volume

__all__ = [
    "AIR_HU",
    "CROP_SIZE",
    "HEADER_CUT_SHORT",
    "LPS_TO_RAS",
    "PIXELS_CUT_SHORT",
    "TARGET_SPACING_MM",
    "CTSeries",
    "CropGrid",
    "DicomSeries",
    "DicomSlice",
    "FileHeader",
    "PastedPlane",
    "SeriesFolder",
    "SeriesReport",
    "SliceGeometry",
    "Skip",
    "consistent_slices",
    "crop_grid",
    "decode_hu",
    "lps_to_pixel",
    "nearest_slice",
    "open_series",
    "paste_plane",
    "pixel_data_problem",
    "read_ct_series",
    "read_nifti_ct",
    "read_file_header",
    "read_nodule_roi",
    "resample_image",
    "resample_mask",
    "series_volume",
    "slice_by_z",
    "walk_files",
    "write_crop_nifti",
]
