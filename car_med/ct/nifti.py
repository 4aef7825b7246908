"""CT volumes and crops as NIfTI files in the scanner frame.

:func:`read_nifti_ct` reads a whole CT volume for prediction (the counterpart of
:func:`car_med.ct.volume.read_ct_series` for a DICOM series); :func:`write_crop_nifti` writes one crop. Nodule
label maps are read by :mod:`car_med.ct.roi`.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from car_med.ct.volume import CTSeries

__all__ = ["read_nifti_ct", "write_crop_nifti"]

_AXIAL_TOLERANCE = 1e-4  # |cos| of the angle between the slice normal and z, off 1


def write_crop_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, xform_code: int = 1) -> None:
    """Write a ``[row, column]`` crop as a NIfTI of shape ``(columns, rows, 1)``.

    Both qform and sform carry the affine with ``xform_code``, so any viewer picks the same frame: 1
    (scanner) for crops cut from a DICOM series, 2 (aligned) for a frame that has the scanner's axis sense but
    not its origin (the PNG release). nibabel writes gzip with a zero timestamp, so equal crops give equal
    bytes. The parent folder is created.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(array.T[:, :, np.newaxis])
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=xform_code)
    image.set_sform(affine, code=xform_code)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def load_nifti(path: Path, what: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist.")
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for files it cannot parse
        raise ValueError(f"{what} {path} cannot be read as NIfTI: {err}") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{what} {path} is a {type(image).__name__}, not a NIfTI image.")
    return image


def nifti_volume(image: nib.Nifti1Image, path: Path, what: str) -> np.ndarray:
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{what} {path} has shape {tuple(image.shape)}; expected one 3D volume (i, j, slice).")
    return data


def checked_affine(image: nib.Nifti1Image, path: Path, what: str) -> np.ndarray:
    """The image's scanner affine, refused when the header has none or it cannot be inverted."""
    header = image.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise ValueError(
            f"{what} {path} has no affine (sform_code and qform_code are both 0): its voxels cannot be placed in "
            "the scanner frame. Convert the DICOM series with dcm2niix, or pass the series with --dicom."
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{what} {path} has a singular or non-finite affine:\n{np.array2string(affine, precision=4)}")
    return affine


def read_nifti_ct(path: str | Path) -> CTSeries:
    """Read a CT volume in Hounsfield units from a NIfTI file (e.g. ``dcm2niix``'s output).

    The volume must be axial: its third axis runs along the scanner's z and its first two span the axial
    plane (any in-plane flip is fine), because crops are cut on axial slices as preprocessing cuts them.

    Returns:
        A :class:`~car_med.ct.volume.CTSeries` whose ``series_uid`` is the file name without its extension
        and which has no DICOM instances (so no DICOM SEG can reference it).

    Raises:
        ValueError: the file is missing or not NIfTI, is not one 3D volume, has no affine (both xform codes 0)
            or a singular one, or is oblique or not axial; the message names the file.
    """
    path = Path(path)
    image = load_nifti(path, "CT")
    data = nifti_volume(image, path, "CT")
    affine = checked_affine(image, path, "CT")
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    in_plane_z = np.abs(axes[2, :2]).max()
    if abs(abs(axes[2, 2]) - 1) > _AXIAL_TOLERANCE or in_plane_z > _AXIAL_TOLERANCE:
        raise ValueError(
            f"CT {path} is oblique or not axial: its voxel axes point along "
            f"{np.array2string(axes.T, precision=3)} (RAS); prediction cuts axial slices, so the third axis must "
            "run along z and the first two lie in the axial plane."
        )
    if np.issubdtype(data.dtype, np.integer) and data.min() >= np.iinfo(np.int16).min and data.max() <= 32767:
        hu = data.astype(np.int16)
    else:
        values = np.asarray(data, dtype=np.float32)
        whole = np.all(values == np.rint(values)) and values.min() >= -32768 and values.max() <= 32767
        hu = values.astype(np.int16) if whole else values
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    return CTSeries(folder=path.parent, series_uid=stem, hu=hu, affine=affine, sop_instance_uids=[], files=[])
