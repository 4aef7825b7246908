"""car_med.ct.nifti: crops written as NIfTI keep their affine and values; a NIfTI CT is read, or refused by name."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from car_med.ct.nifti import read_nifti_ct, write_crop_nifti

AFFINE = np.array([[-0.5, 0, 0, 12.0], [0, -0.5, 0, 30.5], [0, 0, 2.5, -42.5], [0, 0, 0, 1]])


def _save(path, data: np.ndarray, affine: np.ndarray, code: int = 1):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=code)
    image.set_sform(affine, code=code)
    nib.save(image, str(path))
    return path


def test_a_crop_file_keeps_its_affine_in_both_forms_and_its_values_column_first(tmp_path):
    crop = (np.arange(6 * 4).reshape(6, 4) - 1024).astype(np.int16)  # [row, column]
    path = tmp_path / "deep" / "crop.nii.gz"
    write_crop_nifti(path, crop, AFFINE)
    image = nib.load(path)
    assert image.shape == (4, 6, 1) and image.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, 0], crop.T)
    np.testing.assert_allclose(image.affine, AFFINE)
    assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), AFFINE, atol=1e-6)
    first = path.read_bytes()
    write_crop_nifti(path, crop, AFFINE)
    assert path.read_bytes() == first  # equal crops give equal bytes (gzip without a timestamp)


def test_a_nifti_ct_is_read_with_its_affine_and_whole_values_as_int16(tmp_path):
    hu = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3) - 1000
    volume = read_nifti_ct(_save(tmp_path / "patient7.nii.gz", hu, AFFINE))
    assert volume.series_uid == "patient7" and volume.shape == (4, 5, 3)
    assert volume.hu.dtype == np.int16 and volume.sop_instance_uids == []
    np.testing.assert_array_equal(volume.hu, hu.astype(np.int16))
    np.testing.assert_allclose(volume.affine, AFFINE)
    fractional = read_nifti_ct(_save(tmp_path / "half.nii.gz", hu + 0.5, AFFINE))
    assert fractional.hu.dtype == np.float32 and fractional.hu[0, 0, 0] == -999.5


def test_a_nifti_ct_without_affine_oblique_or_missing_is_refused_by_name(tmp_path):
    hu = np.zeros((4, 5, 3), dtype=np.int16)
    with pytest.raises(ValueError, match=r"CT .*missing\.nii\.gz does not exist"):
        read_nifti_ct(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match=r"none\.nii\.gz has no affine \(sform_code and qform_code are both 0\)"):
        read_nifti_ct(_save(tmp_path / "none.nii.gz", hu, AFFINE, code=0))
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    with pytest.raises(ValueError, match=r"tilted\.nii\.gz is oblique or not axial"):
        read_nifti_ct(_save(tmp_path / "tilted.nii.gz", hu, tilt @ AFFINE))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz has shape \(4, 5\); expected one 3D volume"):
        read_nifti_ct(_save(tmp_path / "flat.nii.gz", hu[:, :, 0], AFFINE))
