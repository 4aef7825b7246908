"""The export's files: readable by nibabel and SimpleITK, on the grids their affines say, back on the CT."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from export_cohort import EXPORT_PATIENTS, NUM_SAMPLES, split_of

from car_med.data.lidc import load_lidc_datalist


def _case_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/case.json"))


def _records_with(root: Path, key: str, path: Path) -> list[dict]:
    """The case records whose ``key`` (a path relative to the export folder) is ``path``."""
    wanted = path.relative_to(root).as_posix()
    records = [json.loads(p.read_text()) for p in root.glob("*/*/case.json")]
    found = [r for r in records if r.get(key) == wanted]
    assert found, (key, wanted)
    return found


def _world(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


def test_every_case_is_exported_with_all_files_readable_by_nibabel_and_simpleitk(exported):
    cases = _case_dirs(exported["dir"])
    datalist_items = [
        item
        for split in ("training", "validation", "test")
        for item in load_lidc_datalist(exported["datalist"], split)
        if item["patient_id"] in EXPORT_PATIENTS
    ]
    assert len(cases) == len(datalist_items) > 0
    assert all(s.exit_code == 0 for s in exported["summaries"])
    for case_dir in cases:
        record = json.loads((case_dir / "case.json").read_text())
        for name in ("image", "annotations", "samples", "mean", "calibration", "entropy"):
            path = case_dir / f"{name}.nii.gz"
            image = nib.load(path)
            itk = sitk.ReadImage(str(path))
            # SimpleITK's LPS origin is nibabel's RAS origin with x and y negated
            ras_origin = _world(image.affine, (0, 0, 0))
            assert np.allclose(itk.GetOrigin()[:3], ras_origin * [-1, -1, 1], atol=1e-3), name
            assert np.allclose(itk.GetSpacing()[:2], [0.5, 0.5], atol=1e-4), name
        samples = nib.load(case_dir / "samples.nii.gz")
        assert samples.shape == (128, 128, 1, NUM_SAMPLES) and samples.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(samples.dataobj))) <= {0, 1}
        readers = nib.load(case_dir / "annotations.nii.gz")
        assert readers.shape == (180, 180, 1, record["num_annotators"])
        assert (case_dir / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crop_grid_files_keep_the_crop_affine_and_model_grid_files_sit_at_its_centre(exported):
    items = {
        (item["patient_id"], item["slice_index"], item["nodule_id"]): item
        for split in ("training", "validation", "test")
        for item in load_lidc_datalist(exported["datalist"], split)
    }
    for case_dir in _case_dirs(exported["dir"]):
        record = json.loads((case_dir / "case.json").read_text())
        source = nib.load(items[(record["patient_id"], record["slice_index"], record["nodule_id"])]["image"])
        image = nib.load(case_dir / "image.nii.gz")
        assert np.allclose(image.affine, source.affine, atol=1e-6)
        assert np.array_equal(np.asarray(image.dataobj), np.asarray(source.dataobj))
        model_grid = nib.load(case_dir / "samples.nii.gz").affine
        # model voxel (i, j) is crop voxel (i + 26, j + 26): the same point in the scanner frame
        for index in ((0, 0, 0), (127, 0, 0), (0, 127, 0), (64, 90, 0)):
            crop_index = (index[0] + 26, index[1] + 26, 0)
            assert np.allclose(_world(model_grid, index), _world(source.affine, crop_index), atol=1e-6)
        assert record["grids"]["model"]["offset_in_crop"] == [26, 26]


def test_samples_are_the_registered_models_samples_for_the_recorded_seed(exported):
    import mlflow

    mlflow.set_tracking_uri(exported["tracking_uri"])
    model = mlflow.pyfunc.load_model(exported["uri"])
    case_dir = _case_dirs(exported["dir"])[0]
    record = json.loads((case_dir / "case.json").read_text())
    hu = np.asarray(nib.load(case_dir / "image.nii.gz").dataobj)[26:154, 26:154, 0].astype(np.float32)
    out = model.predict(hu[None, None], params={"num_samples": NUM_SAMPLES, "seed": record["case_seed"]})
    exported_samples = np.asarray(nib.load(case_dir / "samples.nii.gz").dataobj)[:, :, 0, :]
    assert np.array_equal(np.moveaxis(out["samples"][0], 0, -1), exported_samples)
    entropy = np.asarray(nib.load(case_dir / "entropy.nii.gz").dataobj)[:, :, 0]
    assert np.allclose(entropy, out["entropy"][0], atol=1e-6)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_annotations_pasted_back_on_the_ct_equal_pylidc_boolean_masks(exported, pylidc_module):
    pl = pylidc_module
    checked = 0
    for nodule_file in sorted(exported["dir"].glob("*/series_*/nodule_*/annotations_ct.nii.gz")):
        series_dir = nodule_file.parent.parent
        ct = nib.load(series_dir / "ct.nii.gz")
        pasted = np.asarray(nib.load(nodule_file).dataobj).astype(bool)
        assert pasted.shape[:3] == ct.shape and np.allclose(nib.load(nodule_file).affine, ct.affine)
        case = _records_with(exported["dir"], "annotations_ct", nodule_file)[0]
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == case["series_uid"]).first()
        clusters = scan.cluster_annotations()
        annotations = clusters[case["nodule_id"]]
        depth = ct.shape[2]
        zs = (ct.affine @ np.stack([np.zeros(depth), np.zeros(depth), np.arange(depth), np.ones(depth)]))[2]
        for slot, annotation in enumerate(annotations):
            reference = np.zeros(ct.shape, dtype=bool)  # (column, row, k) like the NIfTI
            mask = annotation.boolean_mask()  # [row, column, k] over annotation.bbox()
            rows, columns, ks = annotation.bbox()
            for local_k, k in enumerate(range(ks.start, ks.stop)):
                ct_k = int(np.argmin(np.abs(zs - scan.slice_zvals[k])))
                reference[columns, rows, ct_k] |= mask[:, :, local_k].T
            dice = _dice(pasted[..., slot], reference)
            assert dice >= 0.9, (nodule_file, slot, dice)
            checked += 1
    assert checked >= 3  # 0611's one reader and 0983's two


def test_slices_the_model_did_not_see_are_empty_and_the_seen_ones_hold_samples(exported):
    for samples_file in sorted(exported["dir"].glob("*/series_*/nodule_*/samples_ct.nii.gz")):
        samples = np.asarray(nib.load(samples_file).dataobj)
        ct = nib.load(samples_file.parent.parent / "ct.nii.gz")
        assert samples.shape == (*ct.shape, NUM_SAMPLES) and samples.dtype == np.uint8
        mean = nib.load(samples_file.parent / "mean_ct.nii.gz")
        assert mean.shape == ct.shape and np.allclose(mean.affine, ct.affine)
        for path in (samples_file, samples_file.parent / "mean_ct.nii.gz", samples_file.parents[1] / "ct.nii.gz"):
            itk = sitk.ReadImage(str(path))
            assert itk.GetSize()[:3] == ct.shape
            assert np.allclose(itk.GetOrigin()[:3], _world(ct.affine, (0, 0, 0)) * [-1, -1, 1], atol=1e-3)
        cases = _records_with(exported["dir"], "samples_ct", samples_file)
        seen = {c["slice_index"] for c in cases}
        touched = {int(k) for k in np.nonzero(samples.any(axis=(0, 1, 3)))[0]}
        assert touched <= seen  # DB slice index = CT slice index on the clean cohort (no missing files)


def test_ct_volume_has_the_grid_and_intensities_dcm2niix_writes(exported, tmp_path):
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not on PATH (Debian package dcm2niix; .ci/run installs it)")
    for ct_file in sorted(exported["dir"].glob("*/series_*/ct.nii.gz")):
        case = _records_with(exported["dir"], "ct", ct_file)[0]
        series_folder = (exported["dicom_root"] / case["source_file"]).parent
        out = tmp_path / ct_file.parent.name
        out.mkdir()
        subprocess.run(
            ["dcm2niix", "-z", "y", "-b", "n", "-f", "ct", "-o", str(out), str(series_folder)],
            check=True,
            capture_output=True,
        )
        reference = nib.load(next(out.glob("ct*.nii.gz")))
        ours = nib.load(ct_file)
        assert ours.shape == reference.shape
        # index of our voxel in dcm2niix's array: a signed permutation (axis flips allowed) plus a shift
        to_reference = np.linalg.inv(reference.affine) @ ours.affine
        mapping = np.rint(to_reference)
        assert np.allclose(to_reference, mapping, atol=1e-3)
        assert sorted(np.abs(mapping[:3, :3]).sum(axis=0)) == [1, 1, 1]
        # every voxel's world coordinate matches to 1e-3 mm: both sides are affine in the voxel index, so they
        # agree on the whole grid when they agree on its 8 corners (which span it)
        corners = np.array(np.meshgrid(*[[0, s - 1] for s in ours.shape], indexing="ij")).reshape(3, -1)
        ref_corners = (mapping[:3, :3] @ corners + mapping[:3, 3:4]).astype(int)
        world_ours = ours.affine[:3, :3] @ corners + ours.affine[:3, 3:4]
        world_ref = reference.affine[:3, :3] @ ref_corners + reference.affine[:3, 3:4]
        assert np.abs(world_ours - world_ref).max() < 1e-3
        # and every voxel holds dcm2niix's value: our axis a is its axis r, read forwards or backwards
        reference_axes, steps = np.nonzero(mapping[:3, :3].T)[1], mapping[:3, :3].sum(axis=0).astype(int)
        per_axis = [steps[a] * np.arange(ours.shape[a]) + int(mapping[reference_axes[a], 3]) for a in range(3)]
        reference_hu = np.transpose(reference.get_fdata(), reference_axes)[np.ix_(*per_axis)]
        assert np.array_equal(reference_hu, np.asarray(ours.dataobj))


def compact_path(seg_file: Path, root: Path) -> str:
    return (seg_file.parent / "hypotheses_seg.dcm").relative_to(root).as_posix()


def test_dicom_segs_load_in_highdicom_and_reference_the_source_slices(exported):
    import highdicom as hd
    import pydicom

    segs = sorted(exported["dir"].glob("*/series_*/nodule_*/seg.dcm"))
    assert segs
    for seg_file in segs:
        seg = hd.seg.segread(seg_file)
        cases = _records_with(exported["dir"], "dicom_seg", seg_file)
        referenced = {uid for _, _, uid in seg.get_source_image_uids()}
        assert referenced == {c["sop_instance_uid"] for c in cases}
        source = pydicom.dcmread(exported["dicom_root"] / cases[0]["source_file"], stop_before_pixels=True)
        assert {series for _, series, _ in seg.get_source_image_uids()} == {source.SeriesInstanceUID}
        assert seg.number_of_segments == NUM_SAMPLES + 1
        assert seg.get_segment_description(NUM_SAMPLES + 1).segment_label == "CAR mean >= 0.5"
        compact = hd.seg.segread(seg_file.parent / "hypotheses_seg.dcm")
        hypotheses = json.loads((seg_file.parent / "hypotheses.json").read_text())["hypotheses"]
        assert [compact.get_segment_description(n).segment_label for n in range(1, len(hypotheses) + 1)] == [
            h["label"] for h in hypotheses
        ]
        assert {uid for _, _, uid in compact.get_source_image_uids()} == referenced
        assert all(c["hypotheses_seg"] == compact_path(seg_file, exported["dir"]) for c in cases)


def test_manifest_is_sorted_by_ambiguity_and_export_json_names_model_seed_and_series(exported):
    with open(exported["dir"] / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    scores = [float(r["ambiguity"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len(rows) == len(_case_dirs(exported["dir"]))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(0.0 <= s <= 1.0 for s in scores) and max(scores) > 0.0  # an untrained G still varies
    settings = json.loads((exported["dir"] / "export.json").read_text())
    assert settings["model"]["uri"] == "models:/car-lidc/1" and settings["model"]["version"] == 1
    assert settings["num_samples"] == NUM_SAMPLES and settings["seed"] == 0
    assert set(settings["series_uids"]) == {r["series_uid"] for r in rows}
    assert not (exported["dir"] / ".incomplete").exists()


def test_a_nodule_s_crops_share_their_noise_so_volume_m_is_one_hypothesis(exported, tmp_path):
    records = [json.loads(p.read_text()) for p in exported["dir"].glob("*/*/case.json")]
    by_nodule: dict = {}
    for record in records:
        by_nodule.setdefault((record["patient_id"], record["series_uid"], record["nodule_id"]), set()).add(
            record["case_seed"]
        )
    assert all(len(seeds) == 1 for seeds in by_nodule.values()), by_nodule
    assert len(records) > len(by_nodule)  # some nodule has several crops
    settings = json.loads((exported["dir"] / "export.json").read_text())
    assert "a nodule's crops share their noise" in settings["case_seed"]

    from car_med.export import export_cases

    patient = EXPORT_PATIENTS[0]
    out = tmp_path / "independent"
    summary = export_cases(
        exported["uri"], exported["datalist"], out, split=split_of(exported["datalist"], patient), cases=[patient],
        num_samples=NUM_SAMPLES, tracking_uri=exported["tracking_uri"], progress=False, independent_slices=True,
    )  # fmt: skip
    assert summary.exit_code == 0
    seeds = [json.loads(p.read_text())["case_seed"] for p in out.glob("*/*/case.json")]
    assert len(seeds) > 1 and len(set(seeds)) == len(seeds)
    # sample m of one slice and of the next are unrelated draws: the nodule's hypotheses say so
    [nodule] = out.glob("*/series_*/nodule_*/hypotheses.json")
    payload = json.loads(nodule.read_text())
    assert payload["shared_noise"] is False and payload["case_seed"] is None and "not 3D outlines" in payload["noise"]
