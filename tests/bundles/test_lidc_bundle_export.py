"""``python -m monai.bundle run export`` with bundles/lidc/export.json on a trained bundle output folder."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import pytest
from lidc_bundle_runs import BUNDLE, run_bundle

pytestmark = pytest.mark.slow  # every test runs the bundle in a subprocess on the trained run


def test_bundle_export_samples_the_registered_model_of_the_run(trained_lidc_run):
    out = trained_lidc_run["output_dir"]
    record = json.loads((out / "registered_model.json").read_text())
    result = run_bundle(
        "export",
        ["train.json", "demo.json", "export.json"],
        trained_lidc_run["home"],
        dataset_dir=trained_lidc_run["dataset_dir"],
        output_dir=out,
        export_num_samples=3,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    export_dir = out / "export" / "test"
    settings = json.loads((export_dir / "export.json").read_text())
    assert settings["model"]["uri"] == f"models:/{record['model_name']}/{record['version']}"
    assert settings["model"]["bundle_dir"] == str(out.resolve()) and settings["num_samples"] == 3
    with open(export_dir / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    test_items = json.loads((trained_lidc_run["dataset_dir"] / "datalist.json").read_text())["test"]
    assert len(rows) == len(test_items) and all(r["status"] == "ok" for r in rows)
    samples = nib.load(export_dir / rows[0]["folder"] / "samples.nii.gz")
    roi = json.loads((BUNDLE / "demo.json").read_text())["roi_size"]  # the demo's model input window
    assert samples.shape == (*roi, 1, 3)
    offset = json.loads((export_dir / rows[0]["folder"] / "case.json").read_text())["grids"]["model"]["offset_in_crop"]
    assert offset == [(180 - r) // 2 for r in roi]
    assert "cases exported" in result.stdout


def test_bundle_predict_runs_the_registered_model_on_a_new_patient(trained_lidc_run, clean_cohort, tmp_path):
    out = trained_lidc_run["output_dir"]
    item = json.loads((trained_lidc_run["dataset_dir"] / "datalist.json").read_text())["test"][0]
    crop = nib.load(trained_lidc_run["dataset_dir"] / item["image"])
    x, y, z = -crop.affine[0] @ [90, 90, 0, 1], -crop.affine[1] @ [90, 90, 0, 1], crop.affine[2] @ [90, 90, 0, 1]
    nodules = tmp_path / "nodules.csv"
    nodules.write_text(f"nodule_id,x,y,z,diameter_mm\nA,{x},{y},{z},3\n")
    [series] = {p.parent for p in (clean_cohort / item["patient_id"]).rglob("*.dcm") if item["series_uid"] in str(p)}
    common = {"dataset_dir": trained_lidc_run["dataset_dir"], "output_dir": out, "predict_num_samples": 2}
    result = run_bundle(
        "predict", ["train.json", "demo.json", "predict.json"], trained_lidc_run["home"],
        predict_dicom=series, predict_nodules=nodules, **common,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    settings = json.loads((out / "predict" / "export.json").read_text())
    record = json.loads((out / "registered_model.json").read_text())
    assert settings["model"]["uri"] == f"models:/{record['model_name']}/{record['version']}"
    assert settings["prediction"]["noise"] == "shared by the slices of a nodule"
    assert list((out / "predict").glob("*/series_*/nodule_A/seg.dcm"))
    missing = run_bundle("predict", ["train.json", "demo.json", "predict.json"], trained_lidc_run["home"], **common)
    assert missing.returncode != 0
    assert "bundle key predict_dicom" in missing.stdout and "(--image, predict_image)" in missing.stdout
