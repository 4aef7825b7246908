"""The 0.5 mm crop grid of one CT slice: where a crop is cut, how a slice is resampled onto it, its affine.

Conventions used throughout:

* A CT slice array is indexed ``[row, column]``, exactly like ``pydicom``'s ``pixel_array`` and like pylidc's
  contour matrices, whose ``(i, j)`` are ``(row = y, column = x)``.
* DICOM patient coordinates are LPS. A pixel at (row ``r``, column ``c``) of a slice lies at
  ``IPP + c * PixelSpacing[1] * row_cosine + r * PixelSpacing[0] * column_cosine``, where ``row_cosine`` is
  the first triple of ImageOrientationPatient (the direction in which the column index grows).
* A crop is stored as a NIfTI array of shape ``(180, 180, 1)`` indexed ``(i, j, k) = (column, row, slice)``,
  the order nibabel and ITK use, and its affine maps that index to RAS millimetres (NIfTI's frame), so the
  crop overlays the source series in 3D Slicer, ITK-SNAP or SimpleITK.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

__all__ = [
    "AIR_HU",
    "CROP_SIZE",
    "LPS_TO_RAS",
    "TARGET_SPACING_MM",
    "CropGrid",
    "SliceGeometry",
    "crop_grid",
    "lps_to_pixel",
    "resample_image",
    "resample_mask",
]

CROP_SIZE = 180
"""Side of the square crop in voxels, as in Kohl et al. 2018."""

TARGET_SPACING_MM = 0.5
"""In-plane spacing of the crops; z is left at the scan's own slice position."""

AIR_HU = -1024
"""Fill value for crop voxels that fall outside the CT slice."""

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM's patient frame (LPS) to NIfTI's (RAS): x and y change sign."""


@dataclass(frozen=True)
class SliceGeometry:
    """Where one DICOM slice sits in the scanner's LPS frame.

    Attributes:
        position: ImagePositionPatient, the LPS centre of pixel (row 0, column 0), in mm.
        row_cosine: first triple of ImageOrientationPatient: LPS direction of increasing column index.
        column_cosine: second triple: LPS direction of increasing row index.
        row_spacing: PixelSpacing[0], the distance between rows in mm.
        column_spacing: PixelSpacing[1], the distance between columns in mm.
        slice_spacing: the scan's slice spacing in mm, used only for the affine's third column.
        shape: ``(rows, columns)`` of the slice.
    """

    position: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    row_spacing: float
    column_spacing: float
    slice_spacing: float
    shape: tuple[int, int]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)

    def pixel_to_lps(self, row: float, column: float) -> np.ndarray:
        """LPS millimetres of a (possibly fractional) pixel position."""
        return (
            self.position + column * self.column_spacing * self.row_cosine + row * self.row_spacing * self.column_cosine
        )


@dataclass(frozen=True)
class CropGrid:
    """The 180x180 grid at 0.5 mm of one crop, expressed in the source slice's pixels.

    The grid is a window on one lattice per slice, anchored at pixel (0, 0) with a 0.5 mm step, so every crop
    holds exactly the voxels one would get by resampling the whole slice to 0.5 mm and cutting it.

    Attributes:
        start_row: lattice index of the crop's first row.
        start_column: lattice index of the crop's first column.
        rows: source-pixel row coordinate of every crop row, shape ``(CROP_SIZE,)``.
        columns: source-pixel column coordinate of every crop column, shape ``(CROP_SIZE,)``.
        affine: 4x4 NIfTI affine mapping the crop index ``(i, j, k) = (column, row, 0)`` to RAS mm.
        outside_fraction: the fraction of crop voxels whose centre lies outside the slice, filled with air.
    """

    start_row: int
    start_column: int
    rows: np.ndarray
    columns: np.ndarray
    affine: np.ndarray
    outside_fraction: float


def lps_to_pixel(geometry: SliceGeometry, point: Sequence[float]) -> tuple[float, float, float]:
    """Where an LPS point (mm, as PACS viewers and CAD tools report it) falls on a slice.

    Returns:
        ``(row, column, distance)``: the point's projection onto the slice plane in (fractional) source pixels,
        and its signed distance from the plane along the slice normal, in mm.
    """
    offset = np.asarray(point, dtype=np.float64) - geometry.position
    column = float(offset @ geometry.row_cosine) / geometry.column_spacing
    row = float(offset @ geometry.column_cosine) / geometry.row_spacing
    return row, column, float(offset @ geometry.normal)


def _round_half_up(value: float) -> int:
    # np.round rounds half to even; a fixed rule keeps crops from flipping between equivalent lattice points.
    return int(np.floor(value + 0.5))


def crop_grid(
    geometry: SliceGeometry,
    centre: tuple[float, float],
    size: int = CROP_SIZE,
    spacing: float = TARGET_SPACING_MM,
) -> CropGrid:
    """Place a ``size`` x ``size`` crop at ``spacing`` mm so that its voxel ``(size // 2, size // 2)`` is the
    lattice point nearest to ``centre``.

    Args:
        geometry: the source slice.
        centre: ``(row, column)`` of the lesion centre in source pixels.
        size: crop side in voxels.
        spacing: crop spacing in mm.

    Returns:
        The crop grid, its NIfTI affine and the fraction of it outside the slice.
    """
    half = size // 2
    start_row = _round_half_up(centre[0] * geometry.row_spacing / spacing) - half
    start_column = _round_half_up(centre[1] * geometry.column_spacing / spacing) - half
    steps = np.arange(size, dtype=np.float64)
    rows = (start_row + steps) * spacing / geometry.row_spacing
    columns = (start_column + steps) * spacing / geometry.column_spacing

    origin_lps = (
        geometry.position + start_column * spacing * geometry.row_cosine + start_row * spacing * geometry.column_cosine
    )
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = geometry.row_cosine * spacing
    affine_lps[:3, 1] = geometry.column_cosine * spacing
    affine_lps[:3, 2] = geometry.normal * geometry.slice_spacing
    affine_lps[:3, 3] = origin_lps
    affine = LPS_TO_RAS @ affine_lps

    n_rows, n_columns = geometry.shape
    row_inside = (rows >= -0.5) & (rows <= n_rows - 0.5)
    column_inside = (columns >= -0.5) & (columns <= n_columns - 0.5)
    outside = 1.0 - row_inside.mean() * column_inside.mean()
    return CropGrid(start_row, start_column, rows, columns, affine, float(outside))


def resample_image(pixels: np.ndarray, grid: CropGrid, fill: float = AIR_HU) -> np.ndarray:
    """Bilinearly resample a HU slice onto a crop grid.

    Args:
        pixels: ``(rows, columns)`` HU slice.
        grid: the crop grid.
        fill: value of crop voxels whose centre lies outside the slice's pixel extent.

    Returns:
        int16 array ``(size, size)`` indexed ``[row, column]``.
    """
    rr, cc = np.meshgrid(grid.rows, grid.columns, indexing="ij")
    # "nearest" only matters within the half-pixel rim of the slice; anything beyond it is set to air below.
    values = map_coordinates(pixels.astype(np.float32), [rr, cc], order=1, mode="nearest")
    n_rows, n_columns = pixels.shape
    outside = (rr < -0.5) | (rr > n_rows - 0.5) | (cc < -0.5) | (cc > n_columns - 0.5)
    values[outside] = fill
    return np.rint(values).astype(np.int16)


def resample_mask(mask: np.ndarray, origin: tuple[int, int], grid: CropGrid) -> np.ndarray:
    """Resample a boolean pixel mask onto a crop grid: bilinear on {0, 1}, then keep values >= 0.5.

    Args:
        mask: boolean window of the source slice.
        origin: ``(row, column)`` of the window's first pixel in the slice.
        grid: the crop grid.

    Returns:
        uint8 array ``(size, size)`` of 0/1, indexed ``[row, column]``.
    """
    # One pixel of zero margin makes scipy's "constant" mode (no interpolation past the edge) exact.
    padded = np.pad(mask.astype(np.float32), 1)
    rr, cc = np.meshgrid(grid.rows - origin[0] + 1, grid.columns - origin[1] + 1, indexing="ij")
    values = map_coordinates(padded, [rr, cc], order=1, mode="constant", cval=0.0)
    return (values >= 0.5).astype(np.uint8)
