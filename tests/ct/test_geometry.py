"""car_med.ct.geometry: where a crop is cut, its affine with numbers worked by hand, and resampling onto it."""

from __future__ import annotations

import numpy as np
import pytest

from car_med.ct.geometry import SliceGeometry, crop_grid, lps_to_pixel, resample_image, resample_mask


def _geometry(spacing: float = 0.7) -> SliceGeometry:
    return SliceGeometry(
        position=np.array([-170.0, -160.0, -42.5]),
        row_cosine=np.array([1.0, 0.0, 0.0]),
        column_cosine=np.array([0.0, 1.0, 0.0]),
        row_spacing=spacing,
        column_spacing=spacing,
        slice_spacing=2.5,
        shape=(512, 512),
    )


def test_crop_grid_centre_and_affine():
    geometry = _geometry()
    centre = (250.5, 300.0)
    grid = crop_grid(geometry, centre)
    assert grid.rows.shape == grid.columns.shape == (180,)
    np.testing.assert_allclose(np.diff(grid.rows) * geometry.row_spacing, 0.5)
    # The centre voxel (90, 90) is within a quarter millimetre of the lesion centre along each axis.
    assert abs(grid.rows[90] - centre[0]) * 0.7 <= 0.25 + 1e-9
    assert abs(grid.columns[90] - centre[1]) * 0.7 <= 0.25 + 1e-9
    lesion_lps = geometry.pixel_to_lps(*centre)
    voxel_ras = grid.affine @ np.array([90, 90, 0, 1.0])
    assert np.linalg.norm(voxel_ras[:3] * [-1, -1, 1] - lesion_lps) <= 0.5
    # NIfTI index i runs along columns (LPS +x, so RAS -x), j along rows; k carries the slice spacing.
    np.testing.assert_allclose(grid.affine[:3, :3], np.diag([-0.5, -0.5, 2.5]))
    assert grid.outside_fraction == 0.0


def test_crop_grid_affine_by_hand_and_back_to_the_source_pixels():
    grid = crop_grid(_geometry(), (250.5, 300.0))
    # lattice start: row round(250.5 * 0.7 / 0.5) - 90 = 351 - 90 = 261, column round(300 * 0.7 / 0.5) - 90 = 330
    assert (grid.start_row, grid.start_column) == (261, 330)
    # first voxel in LPS: (-170 + 330 * 0.5, -160 + 261 * 0.5, -42.5) = (-5.0, -29.5, -42.5); RAS flips x and y
    np.testing.assert_allclose(grid.affine[:3, 3], [5.0, 29.5, -42.5])
    np.testing.assert_allclose(grid.rows[[0, -1]], [261 * 0.5 / 0.7, 440 * 0.5 / 0.7])
    # every crop voxel, taken to LPS by the affine, falls on the source pixel the grid samples
    for i, j in [(0, 0), (179, 0), (37, 121), (179, 179)]:
        ras = grid.affine @ np.array([i, j, 0.0, 1.0])
        row, column, distance = lps_to_pixel(_geometry(), ras[:3] * [-1, -1, 1])
        assert (row, column, distance) == pytest.approx((grid.rows[j], grid.columns[i], 0.0), abs=1e-9)


def test_crop_grid_outside_fraction_at_the_corner():
    grid = crop_grid(_geometry(0.5), (0.0, 0.0))
    # 90 of 180 rows and columns fall before pixel 0 (by more than half a pixel): three quarters outside.
    assert grid.outside_fraction == pytest.approx(1 - (90 / 180) ** 2)


def test_lps_to_pixel_inverts_pixel_to_lps_for_a_rotated_slice():
    geometry = SliceGeometry(
        position=np.array([10.0, -20.0, 5.0]),
        row_cosine=np.array([0.0, 1.0, 0.0]),
        column_cosine=np.array([-1.0, 0.0, 0.0]),
        row_spacing=0.6,
        column_spacing=0.8,
        slice_spacing=1.0,
        shape=(64, 64),
    )
    point = geometry.pixel_to_lps(12.25, 40.5) + np.array([0.0, 0.0, 3.0])  # 3 mm above the plane
    np.testing.assert_allclose(point, [10.0 - 12.25 * 0.6, -20.0 + 40.5 * 0.8, 8.0])
    assert lps_to_pixel(geometry, point) == pytest.approx((12.25, 40.5, 3.0))


def test_resampling_is_bilinear_inside_and_air_outside_and_a_mask_keeps_half_or_more():
    geometry = _geometry(0.5)
    rows, columns = np.meshgrid(np.arange(512.0), np.arange(512.0), indexing="ij")
    ramp = 2.0 * rows + 3.0 * columns  # bilinear resampling reproduces a linear ramp exactly
    grid = crop_grid(geometry, (100.25, 200.0), size=10, spacing=0.25)
    expected = 2.0 * grid.rows[:, None] + 3.0 * grid.columns[None, :]
    np.testing.assert_array_equal(resample_image(ramp, grid), np.rint(expected).astype(np.int16))
    corner = crop_grid(geometry, (0.0, 0.0), size=10, spacing=0.5)
    image = resample_image(ramp, corner)
    assert (image[:5] == -1024).all() and (image[6:, 6:] != -1024).all()  # rows before -0.5 px are air
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True  # pixels (101..102, 201..202) of the slice, the window starting at (100, 200)
    fine = crop_grid(geometry, (101.5, 201.5), size=8, spacing=0.25)
    resampled = resample_mask(mask, (100, 200), fine)

    def hat(t: np.ndarray, first: int) -> np.ndarray:  # bilinear weight of pixels first, first + 1 along one axis
        return np.clip(1.0 - np.maximum(first - t, t - (first + 1)), 0.0, 1.0)

    expected = hat(fine.rows, 101)[:, None] * hat(fine.columns, 201)[None, :] >= 0.5
    assert resampled.dtype == np.uint8 and expected.sum() == 21
    np.testing.assert_array_equal(resampled.astype(bool), expected)
