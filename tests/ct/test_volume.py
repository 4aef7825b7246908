"""car_med.ct.volume: a DICOM series as one volume (values, grid, refusals) and maps pasted back onto it.

Expected values and affines are computed here from what tests/ct/dicom_files.py wrote, not from the library.
"""

from __future__ import annotations

import numpy as np
import pytest
from dicom_files import ORIGIN, RESCALE_INTERCEPT, SERIES_UID, stored_pixels, write_series, write_slice

from car_med.ct.geometry import crop_grid
from car_med.ct.volume import paste_plane, read_ct_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ZS = [0.0, 2.5, 5.0, 7.5]


def test_a_series_becomes_one_volume_with_its_values_and_scanner_affine(tmp_path):
    write_series(tmp_path, [5.0, 0.0, 7.5, 2.5], pixel_spacing=(0.6, 0.8))  # rows 0.6 mm apart, columns 0.8 mm
    (tmp_path / "notes.txt").write_text("ignored\n")
    volume = read_ct_series(tmp_path, SERIES_UID)
    assert volume.shape == (16, 16, 4) and volume.hu.dtype == np.int16
    for k, z in enumerate(ZS):  # (column, row, slice), slices sorted by z
        np.testing.assert_array_equal(volume.hu[:, :, k], stored_pixels(z).T.astype(np.int16) + RESCALE_INTERCEPT)
    # voxel (i, j, k) = (column, row, slice) lies at IPP + i * 0.8 mm along x + j * 0.6 mm along y + k * 2.5 mm
    expected_lps = np.array([[0.8, 0, 0, ORIGIN[0]], [0, 0.6, 0, ORIGIN[1]], [0, 0, 2.5, 0.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ expected_lps, atol=1e-9)
    assert [f.name for f in volume.files] == ["z0000.dcm", "z0025.dcm", "z0050.dcm", "z0075.dcm"]
    geometry = volume.slice_geometry(2)
    np.testing.assert_allclose(geometry.position, [*ORIGIN, 5.0])
    assert (geometry.row_spacing, geometry.column_spacing, geometry.shape) == (0.6, 0.8, (16, 16))
    np.testing.assert_array_equal(volume.plane(2), stored_pixels(5.0).astype(np.int16) + RESCALE_INTERCEPT)


def test_a_missing_slice_or_a_slice_of_another_size_is_refused_by_name(tmp_path):
    write_series(tmp_path / "gap", [0.0, 2.5, 7.5])
    with pytest.raises(ValueError, match=r"slice steps of series .* range from 2\.500 to 5\.000 mm"):
        read_ct_series(tmp_path / "gap", SERIES_UID)
    write_series(tmp_path / "sizes", [0.0, 2.5])
    write_slice(tmp_path / "sizes" / "big.dcm", z=5.0, rows=20)
    with pytest.raises(ValueError, match=r"big\.dcm: 20x16 pixels, z0000\.dcm has 16x16"):
        read_ct_series(tmp_path / "sizes", SERIES_UID)


def test_paste_plane_puts_a_crop_grid_map_back_on_the_slice_it_was_cut_from(tmp_path):
    write_series(tmp_path, ZS)
    volume = read_ct_series(tmp_path, SERIES_UID)
    grid = crop_grid(volume.slice_geometry(1), (8.0, 8.0), size=8, spacing=0.35)  # 8 x 0.35 mm = 4 pixels of 0.7
    ones = np.ones((8, 8, 1), dtype=np.float32)
    pasted = paste_plane(ones, grid.affine, volume.affine, volume.shape, binary=True)
    assert pasted.k == 1 and pasted.values.dtype == np.uint8
    covered = np.zeros(volume.shape[:2], dtype=np.uint8)
    covered[pasted.window] = pasted.values[..., 0]
    # the crop's voxel centres lie on pixels 6.0, 6.5, .. 9.5, so it reaches 5.75 .. 9.75: CT voxels 6 .. 9 get 1
    assert covered.sum() == 16 and covered[6:10, 6:10].all()
    shifted = grid.affine.copy()
    shifted[2, 3] += 1.0  # 1 mm off the slice plane
    with pytest.raises(ValueError, match=r"the crop plane lies 1\.000 mm off CT slice"):
        paste_plane(ones, shifted, volume.affine, volume.shape, binary=True)
