"""Nodule regions drawn on a CT: a NIfTI label map or a DICOM SEG, read onto the CT's voxel grid.

Prediction takes each label (NIfTI) or segment (DICOM SEG) as one nodule, whose slices are the ones the mask
touches and whose centre is the mask's centroid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from car_med.ct.nifti import checked_affine, load_nifti, nifti_volume
from car_med.ct.volume import CTSeries

__all__ = ["GRID_TOLERANCE_MM", "read_nodule_roi"]

#: how far (mm) two affines may place a voxel apart and still be one grid
GRID_TOLERANCE_MM = 1e-3


def read_nodule_roi(path: str | Path, ct: CTSeries) -> dict[str, np.ndarray]:
    """Read the nodules of a NIfTI label map or a DICOM SEG onto ``ct``'s voxel grid.

    Args:
        path: a NIfTI label map (0 background, one positive integer per nodule) on the CT's grid, or a DICOM
            SEG (one segment per nodule) whose frames reference the CT's DICOM instances.
        ct: the CT the regions were drawn on.

    Returns:
        ``{nodule id: boolean mask of ct.shape}``, in increasing label or segment number; the id is the label or
        the segment number as text.

    Raises:
        ValueError: the file is missing or unreadable; lies on another grid than the CT (shape, affine, or SEG
            frames that reference other instances or another frame size); holds non-integer or negative labels;
            or marks nothing. The message names the file and what differs.
    """
    path = Path(path)
    if path.is_file() and _is_dicom(path):
        return _segments(path, ct)
    return _labels(path, ct)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _labels(path: Path, ct: CTSeries) -> dict[str, np.ndarray]:
    image = load_nifti(path, "ROI")
    data = nifti_volume(image, path, "ROI")
    affine = checked_affine(image, path, "ROI")
    if tuple(data.shape) != ct.shape:
        raise ValueError(
            f"ROI {path} has shape {tuple(data.shape)}, the CT {ct.shape}: the ROI must lie on the CT's voxel grid."
        )
    corners = np.array([[i, j, k, 1.0] for i in (0, ct.shape[0]) for j in (0, ct.shape[1]) for k in (0, ct.shape[2])])
    offset = np.abs((affine - ct.affine) @ corners.T)[:3].max()
    if offset > GRID_TOLERANCE_MM:
        raise ValueError(
            f"ROI {path} lies on another grid than the CT (its affine places voxels up to {offset:.3g} mm away):\n"
            f"ROI affine\n{np.array2string(affine, precision=4)}\nCT affine\n"
            f"{np.array2string(ct.affine, precision=4)}"
        )
    values = np.asarray(data)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.rint(values)):
            raise ValueError(f"ROI {path} holds non-integer values; expected labels 0 (background), 1, 2, ...")
        values = np.rint(values).astype(np.int64)
    if values.min() < 0:
        raise ValueError(f"ROI {path} holds negative labels ({int(values.min())}); expected 0, 1, 2, ...")
    labels = [int(v) for v in np.unique(values) if v > 0]
    if not labels:
        raise ValueError(f"ROI {path} marks no voxel: every value is 0.")
    return {str(label): values == label for label in labels}


def _segments(path: Path, ct: CTSeries) -> dict[str, np.ndarray]:
    import highdicom as hd

    if not ct.sop_instance_uids:
        raise ValueError(
            f"ROI {path} is a DICOM SEG, which references DICOM instances; the CT {ct.folder / ct.series_uid} is a "
            "NIfTI volume. Pass the series with --dicom, or the ROI as a NIfTI label map."
        )
    try:
        seg = hd.seg.segread(str(path))
    except (pydicom.errors.InvalidDicomError, AttributeError, ValueError, KeyError) as err:
        raise ValueError(f"ROI {path} cannot be read as a DICOM SEG: {err}") from err
    referenced = [uid for _, _, uid in seg.get_source_image_uids()]
    unknown = sorted(set(referenced) - set(ct.sop_instance_uids))
    if unknown:
        raise ValueError(
            f"ROI {path} lies on another grid than the CT: it references {len(unknown)} instance(s) that series "
            f"{ct.series_uid} does not hold (first {unknown[0]})."
        )
    if (int(seg.Rows), int(seg.Columns)) != (ct.shape[1], ct.shape[0]):
        raise ValueError(
            f"ROI {path} has {seg.Rows}x{seg.Columns} frames, the CT's slices {ct.shape[1]}x{ct.shape[0]} pixels."
        )
    numbers = [int(n) for n in seg.get_segment_numbers()]
    uids = sorted(set(referenced), key=ct.sop_instance_uids.index)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, assert_missing_frames_are_empty=True
    )  # (instances, rows, columns, segments); fractional segments come back as probabilities
    masks: dict[str, np.ndarray] = {}
    for s, number in enumerate(numbers):
        mask = np.zeros(ct.shape, dtype=bool)
        for f, uid in enumerate(uids):
            mask[:, :, ct.sop_instance_uids.index(uid)] = pixels[f, :, :, s].T >= 0.5
        if mask.any():
            masks[str(number)] = mask
    if not masks:
        raise ValueError(f"ROI {path} marks no pixel in any of its {len(numbers)} segment(s).")
    return masks
