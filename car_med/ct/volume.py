"""The source CT series as one NIfTI volume, and crop-grid maps pasted back onto its voxels.

The volume is indexed ``(i, j, k) = (column, row, slice)``, slices sorted along the slice normal, with the
affine from the first slice's ImagePositionPatient, the direction cosines and the measured slice step, in RAS
(NIfTI's frame). That is the voxel grid ``dcm2niix`` writes for the same series, up to axis flips.

Crop-grid maps (the 180x180 crop, the 128x128 model window) lie in one CT slice plane; each CT voxel of that
slice takes the bilinear value of the map at its own centre, so the way back uses the same rule as the way
in (:func:`car_med.ct.geometry.resample_mask`: bilinear, then >= 0.5 for masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from scipy.ndimage import map_coordinates

from car_med.ct.dicom import DicomSlice, decode_hu
from car_med.ct.geometry import LPS_TO_RAS, SliceGeometry
from car_med.ct.series import DicomSeries, open_series

__all__ = ["PLANE_TOLERANCE_MM", "CTSeries", "PastedPlane", "paste_plane", "read_ct_series", "series_volume"]

#: how far (mm) a crop's plane may lie from a CT slice, and how uneven slice steps may be
PLANE_TOLERANCE_MM = 1e-2


@dataclass
class CTSeries:
    """One CT series read from its DICOM files.

    Attributes:
        folder: the series folder.
        series_uid: SeriesInstanceUID.
        hu: Hounsfield units ``(columns, rows, slices)``; int16 when every slice's rescale gives whole numbers.
        affine: 4x4 RAS affine of ``hu``'s index.
        sop_instance_uids: SOPInstanceUID of slice ``k``.
        files: the file of slice ``k``.
    """

    folder: Path
    series_uid: str
    hu: np.ndarray
    affine: np.ndarray
    sop_instance_uids: list[str]
    files: list[Path] = field(repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    def slice_of(self, sop_instance_uid: str) -> int | None:
        try:
            return self.sop_instance_uids.index(str(sop_instance_uid))
        except ValueError:
            return None

    def slice_geometry(self, k: int) -> SliceGeometry:
        """Slice ``k`` as a DICOM slice would describe it (position of its first voxel, direction cosines and
        spacings in LPS), so crops are cut from a volume as from the series' files."""
        lps = LPS_TO_RAS @ self.affine
        column_step, row_step, slice_step = (lps[:3, axis] for axis in range(3))
        return SliceGeometry(
            position=(lps @ np.array([0.0, 0.0, float(k), 1.0]))[:3],
            row_cosine=column_step / np.linalg.norm(column_step),
            column_cosine=row_step / np.linalg.norm(row_step),
            row_spacing=float(np.linalg.norm(row_step)),
            column_spacing=float(np.linalg.norm(column_step)),
            slice_spacing=float(np.linalg.norm(slice_step)),
            shape=(self.shape[1], self.shape[0]),
        )

    def plane(self, k: int) -> np.ndarray:
        """Slice ``k``'s HU as ``[row, column]``, the layout of a DICOM slice's pixels."""
        return np.asarray(self.hu[:, :, k]).T

    def datasets(self, indices: Sequence[int]) -> list[pydicom.Dataset]:
        """The full DICOM datasets of slices ``indices`` (for DICOM SEG, which copies their attributes)."""
        return [pydicom.dcmread(self.files[k]) for k in indices]


def read_ct_series(folder: str | Path, series_uid: str) -> CTSeries:
    """Read every slice of series ``series_uid`` in ``folder`` into one volume.

    The folder is opened as preprocessing opens it (:func:`car_med.ct.series.open_series`); files of other
    series and non-DICOM files in the folder are ignored. Of two files at one position, the one preprocessing
    keeps is used, and the other is logged.

    Raises:
        ValueError: as :meth:`car_med.ct.series.SeriesFolder.whole_series` (no such series, a file of it cut
            short or unplaceable, inconsistent or oblique slices) and :func:`series_volume` (slices of
            different sizes, uneven slice steps, undecodable pixels). The message names the folder or the file
            and what differs.
    """
    folder = Path(folder)
    series = open_series(folder, str(series_uid)).whole_series(str(series_uid))
    return series_volume(series, folder)


def series_volume(series: DicomSeries, folder: Path) -> CTSeries:
    """Decode the slices of an opened series into one volume on a regular grid.

    Args:
        series: a series whose every file is a usable slice (:meth:`car_med.ct.series.SeriesFolder.whole_series`).
        folder: the folder it was opened from, recorded in the volume and named in errors.

    Raises:
        ValueError: the slices differ in size; the slice steps are uneven (a slice is missing: a regular NIfTI
            grid cannot hold the series); or a slice's pixel data cannot be decoded. The message names the
            folder or the file and what differs.
    """
    slices = list(series.slices)
    first = slices[0]
    odd = next((s for s in slices if s.geometry.shape != first.geometry.shape), None)
    if odd is not None:
        raise ValueError(
            f"{odd.path}: {odd.geometry.shape[0]}x{odd.geometry.shape[1]} pixels, {Path(first.path).name} has "
            f"{first.geometry.shape[0]}x{first.geometry.shape[1]}."
        )
    slices, step_vector = _regular_steps(slices, folder=folder, series_uid=series.series_uid)
    geometry = slices[0].geometry
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = geometry.row_cosine * geometry.column_spacing
    affine_lps[:3, 1] = geometry.column_cosine * geometry.row_spacing
    affine_lps[:3, 2] = step_vector
    affine_lps[:3, 3] = geometry.position
    return CTSeries(
        folder=folder,
        series_uid=series.series_uid,
        hu=_decode_volume(slices),
        affine=LPS_TO_RAS @ affine_lps,
        sop_instance_uids=[s.sop_instance_uid for s in slices],
        files=[Path(s.path) for s in slices],
    )


def _regular_steps(slices: list[DicomSlice], folder: Path, series_uid: str) -> tuple[list[DicomSlice], np.ndarray]:
    """The slices sorted along their normal and the step between two neighbours (LPS mm), refused when the
    steps are uneven."""
    normal = slices[0].geometry.normal
    slices = sorted(slices, key=lambda s: float(s.geometry.position @ normal))
    positions = [s.geometry.position for s in slices]
    steps = np.diff([float(p @ normal) for p in positions])
    if len(steps) > 1 and steps.max() - steps.min() > PLANE_TOLERANCE_MM * max(1.0, steps.min()):
        raise ValueError(
            f"{folder}: slice steps of series {series_uid} range from {steps.min():.3f} to {steps.max():.3f} mm "
            "(a slice is missing or the spacing is irregular); one regular NIfTI grid cannot hold it."
        )
    step_vector = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else normal
    return slices, step_vector


def _decode_volume(slices: list[DicomSlice]) -> np.ndarray:
    """HU ``(columns, rows, slices)``: int16 when every value is a whole number in its range, else float32."""
    planes = []
    for item in slices:
        try:
            planes.append(decode_hu(item))
        except Exception as err:  # pydicom raises many types for broken pixel data
            raise ValueError(f"{item.path}: pixel data cannot be decoded: {err}") from err
    volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # [row, column, k] -> (column, row, k)
    whole = bool(np.all(volume == np.rint(volume)))
    fits_int16 = whole and volume.min() >= np.iinfo(np.int16).min and volume.max() <= np.iinfo(np.int16).max
    return volume.astype(np.int16) if fits_int16 else volume.astype(np.float32)


@dataclass(frozen=True)
class PastedPlane:
    """A map resampled onto one CT slice: ``values`` fill ``window`` of slice ``k``.

    Attributes:
        k: the CT slice index.
        window: ``(column slice, row slice)`` of the CT voxels the map covers.
        values: ``(columns, rows, N)`` resampled values, N maps (e.g. the samples).
    """

    k: int
    window: tuple[slice, slice]
    values: np.ndarray


def paste_plane(
    maps: np.ndarray,
    map_affine: np.ndarray,
    ct_affine: np.ndarray,
    ct_shape: Sequence[int],
    binary: bool,
) -> PastedPlane:
    """Resample 2D maps on a crop grid onto the CT slice they lie in.

    Args:
        maps: ``(I, J, N)`` maps indexed like the crop NIfTIs (``(I, J, 1)`` files, N stacked on the last axis).
        map_affine: the maps' 4x4 RAS affine (index ``(i, j, 0)``).
        ct_affine: the CT volume's affine.
        ct_shape: ``(columns, rows, slices)`` of the CT volume.
        binary: masks (bilinear, then >= 0.5, uint8) rather than probabilities (bilinear, float32).

    Returns:
        The slice, window and values; CT voxels whose centre lies outside the crop get 0.

    Raises:
        ValueError: the crop's plane is not one of the CT's slice planes.
    """
    to_map = np.linalg.inv(map_affine) @ ct_affine  # CT index -> map index
    to_ct = np.linalg.inv(ct_affine) @ map_affine
    plane = to_ct @ np.array([0.0, 0.0, 0.0, 1.0])
    k = int(np.rint(plane[2]))
    in_plane_drift = np.abs(to_ct[2, :2]).max() * max(maps.shape[:2])
    voxel_step = np.linalg.norm(ct_affine[:3, 2])
    if abs(plane[2] - k) * voxel_step > PLANE_TOLERANCE_MM or in_plane_drift * voxel_step > PLANE_TOLERANCE_MM:
        raise ValueError(
            f"the crop plane lies {abs(plane[2] - k) * voxel_step:.3f} mm off CT slice {k} or is tilted against "
            "it: the crop was not cut from this series' slices."
        )
    if not 0 <= k < ct_shape[2]:
        raise ValueError(f"the crop lies on CT slice {k}, outside the series' {ct_shape[2]} slices.")
    corners = np.array([[a, b, 0.0, 1.0] for a in (-0.5, maps.shape[0] - 0.5) for b in (-0.5, maps.shape[1] - 0.5)])
    ct_corners = (to_ct @ corners.T)[:2]
    low = np.clip(np.floor(ct_corners.min(axis=1)).astype(int), 0, None)
    high = np.minimum(np.ceil(ct_corners.max(axis=1)).astype(int) + 1, np.asarray(ct_shape[:2]))
    ii, jj = np.meshgrid(np.arange(low[0], high[0]), np.arange(low[1], high[1]), indexing="ij")
    coords = to_map @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)])
    # one voxel of zero margin makes "constant" mode exact at the crop's edge, as in the crop's own resampling
    padded = np.pad(maps.astype(np.float32), ((1, 1), (1, 1), (0, 0)))
    values = np.stack(
        [
            map_coordinates(padded[..., n], [coords[0] + 1, coords[1] + 1], order=1, mode="constant", cval=0.0)
            for n in range(maps.shape[-1])
        ],
        axis=-1,
    ).reshape(*ii.shape, maps.shape[-1])
    values = (values >= 0.5).astype(np.uint8) if binary else values.astype(np.float32)
    return PastedPlane(k=k, window=(slice(low[0], high[0]), slice(low[1], high[1])), values=values)
