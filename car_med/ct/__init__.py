"""CT input for the whole project: where a CT is read and where a crop is cut.

- :mod:`car_med.ct.dicom`: a DICOM series' files, headers, geometry checks, pixel-data checks, HU decoding.
- :mod:`car_med.ct.geometry`: the 0.5 mm crop grid of a slice, resampling onto it, its scanner-frame affine.
- :mod:`car_med.ct.volume`: a whole series as one volume, and crop-grid maps pasted back onto it.
- :mod:`car_med.ct.nifti`: a CT volume from NIfTI, and crops as NIfTI files.
- :mod:`car_med.ct.roi`: nodule regions (a NIfTI label map or a DICOM SEG) on a CT's voxel grid.

Preprocessing, the review export and prediction all read and cut through these functions, so a crop cut
for training and one cut for a new patient at the same centre are the same voxels.
"""

from __future__ import annotations

from car_med.ct.dicom import (
    HEADER_CUT_SHORT,
    PIXELS_CUT_SHORT,
    DicomSlice,
    SeriesFiles,
    Skip,
    consistent_slices,
    decode_hu,
    nearest_slice,
    pixel_data_problem,
    read_series_headers,
    slice_by_z,
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
from car_med.ct.volume import CTSeries, PastedPlane, paste_plane, read_ct_series

__all__ = [
    "AIR_HU",
    "CROP_SIZE",
    "HEADER_CUT_SHORT",
    "LPS_TO_RAS",
    "PIXELS_CUT_SHORT",
    "TARGET_SPACING_MM",
    "CTSeries",
    "CropGrid",
    "DicomSlice",
    "PastedPlane",
    "SeriesFiles",
    "SliceGeometry",
    "Skip",
    "consistent_slices",
    "crop_grid",
    "decode_hu",
    "lps_to_pixel",
    "nearest_slice",
    "paste_plane",
    "pixel_data_problem",
    "read_ct_series",
    "read_nifti_ct",
    "read_nodule_roi",
    "read_series_headers",
    "resample_image",
    "resample_mask",
    "slice_by_z",
    "walk_files",
    "write_crop_nifti",
]
