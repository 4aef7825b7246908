"""car_med.ct.roi: nodule regions from a NIfTI label map on the CT's grid, and every refusal naming the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from car_med.ct.roi import read_nodule_roi
from car_med.ct.volume import CTSeries

AFFINE = np.array([[-0.7, 0, 0, 5.0], [0, -0.7, 0, 8.0], [0, 0, 2.5, 0.0], [0, 0, 0, 1]])


def _ct(sop_instance_uids: list[str] | None = None) -> CTSeries:
    return CTSeries(
        folder=Path("ct"), series_uid="1.2", hu=np.zeros((8, 6, 4), np.int16), affine=AFFINE,
        sop_instance_uids=sop_instance_uids or [], files=[],
    )  # fmt: skip


def _save(path, data: np.ndarray, affine: np.ndarray = AFFINE):
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(path))
    return path


def test_each_label_is_one_nodule_mask_on_the_ct_grid(tmp_path):
    labels = np.zeros((8, 6, 4), dtype=np.uint8)
    labels[1:3, 1:3, 1] = 2
    labels[5, 4, 2:4] = 7
    masks = read_nodule_roi(_save(tmp_path / "roi.nii.gz", labels), _ct())
    assert list(masks) == ["2", "7"]
    np.testing.assert_array_equal(masks["2"], labels == 2)
    assert masks["7"].sum() == 2 and masks["7"].shape == (8, 6, 4)
    as_float = read_nodule_roi(_save(tmp_path / "float.nii.gz", labels.astype(np.float32)), _ct())
    assert list(as_float) == ["2", "7"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("shape", r"roi\.nii\.gz has shape \(8, 6, 3\), the CT \(8, 6, 4\)"),
        ("shifted", r"roi\.nii\.gz lies on another grid than the CT \(its affine places voxels up to 1 mm away\)"),
        ("empty", r"roi\.nii\.gz marks no voxel: every value is 0"),
        ("negative", r"roi\.nii\.gz holds negative labels \(-1\)"),
        ("fractional", r"roi\.nii\.gz holds non-integer values"),
    ],
)
def test_a_label_map_off_the_ct_grid_or_without_labels_is_refused_by_name(tmp_path, case, message):
    labels = np.zeros((8, 6, 4), dtype=np.float32)
    labels[2, 2, 2] = 1
    affine = AFFINE.copy()
    if case == "shape":
        labels = labels[:, :, :3]
    elif case == "shifted":
        affine[0, 3] += 1.0
    elif case == "empty":
        labels[:] = 0
    elif case == "negative":
        labels[0, 0, 0] = -1
    elif case == "fractional":
        labels[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=message):
        read_nodule_roi(_save(tmp_path / "roi.nii.gz", labels, affine), _ct())


def test_a_dicom_seg_needs_a_ct_with_dicom_instances(tmp_path):
    import pydicom

    seg = tmp_path / "seg.dcm"
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.save_as(seg, enforce_file_format=True)
    with pytest.raises(ValueError, match=r"seg\.dcm is a DICOM SEG, which references DICOM instances"):
        read_nodule_roi(seg, _ct())
