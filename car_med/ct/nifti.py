"""CT crops as NIfTI files in the scanner frame."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["write_crop_nifti"]


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
