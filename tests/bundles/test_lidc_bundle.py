"""The LIDC bundle end to end, as users run it: training, registry, evaluation, inference, metadata."""

from __future__ import annotations

import csv
import json
import sqlite3

import mlflow
import numpy as np
import pytest
from lidc_bundle_runs import BUNDLE, run_bundle

from car_med.data.lidc import load_lidc_datalist
from car_med.evaluation.hypotheses import HYPOTHESIS_METRICS, HYPOTHESIS_REFERENCE_ROWS

ROI = tuple(json.loads((BUNDLE / "demo.json").read_text())["roi_size"])  # the demo trains on smaller crops


def _hu_batch(batch: int = 2, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1024.0, 400.0, size=(batch, 1, size, size)).astype(np.float32)


@pytest.mark.slow
def test_training_writes_checkpoints_validation_and_one_mlflow_run(trained_lidc_run):
    out = trained_lidc_run["output_dir"]
    names = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert names == [
        "best_stage2.pt",
        "stage1_checkpoint_epoch=1.pt",
        "stage1_checkpoint_iteration=6.pt",
        "stage2_checkpoint_epoch=1.pt",
        "stage2_checkpoint_iteration=6.pt",
    ]
    history = json.loads((out / "validation.json").read_text())
    assert [entry["iteration"] for entry in history["history"]] == [3, 6]
    assert set(history["last"]) == {"iteration", "ged16", "hm_iou16", "diversity16", "presence_gap", "speckle", "ece"}
    # the reference rows, scored on the same validation cases
    assert set(history["references"]) == {"readers_oracle", "majority_vote", "f_threshold", "f_bernoulli"}
    assert history["references"]["majority_vote"]["diversity16"] == 0.0
    assert 0.0 <= history["last"]["hm_iou16"] <= 1.0 and history["best_iteration"] in (3, 6)
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "validation_0000003.png",
        "validation_0000006.png",
    ]

    with sqlite3.connect(out / "mlflow.db") as db:
        runs = db.execute("select run_uuid, name, status from runs").fetchall()
        assert len(runs) == 1 and runs[0][2] == "FINISHED"
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
        params = dict(db.execute("select key, value from params").fetchall())
    assert {"loss_f", "loss_g", "loss_adv", "loss_cal", "loss_d", "val_ged16", "val_hm_iou16"} <= keys
    assert {"val_presence_gap", "val_speckle", "val_ref_majority_vote_ged16", "val_ref_readers_oracle_ged16"} <= keys
    assert {"lambda_cal", "num_samples", "batch_size", "seed", "stage2_iterations"} <= set(params)
    # demo.json's F: one reader per step, BatchNorm (the fidelity benchmark's overlay switches both)
    assert params["f_target"] == "one_reader" and params["f_norm"] == "batch"


@pytest.mark.slow
def test_registered_model_predicts_reproducible_samples(trained_lidc_run):
    out = trained_lidc_run["output_dir"]
    record = json.loads((out / "registered_model.json").read_text())
    assert record["model_name"] == "car-lidc" and record["version"] == 1
    assert record["weights"].endswith("best_stage2.pt")
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/car-lidc/latest")
        x = _hu_batch()
        first = model.predict(x, params={"num_samples": 8, "seed": 0})
        again = model.predict(x, params={"num_samples": 8, "seed": 0})
        other = model.predict(x, params={"num_samples": 8, "seed": 1})
    finally:
        mlflow.set_tracking_uri(None)
    assert first["samples"].shape == (2, 8, 128, 128) and first["samples"].dtype == np.uint8
    assert first["mean"].shape == first["calibration"].shape == (2, 2, 128, 128)
    assert first["entropy"].shape == (2, 128, 128) and first["mean"].dtype == np.float32
    assert np.array_equal(first["samples"], again["samples"])
    assert not np.array_equal(first["samples"], other["samples"])
    np.testing.assert_allclose(first["calibration"], other["calibration"], atol=1e-6)  # F has no noise


@pytest.mark.slow
def test_rerun_of_a_finished_training_trains_and_registers_nothing(trained_lidc_run):
    out = trained_lidc_run["output_dir"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")}
    result = run_bundle(
        "training",
        ["train.json", "demo.json"],
        trained_lidc_run["home"],
        dataset_dir=trained_lidc_run["dataset_dir"],
        output_dir=out,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "finished in an earlier run" in result.stdout and "not registered again" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")} == before
    with sqlite3.connect(out / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1
        assert db.execute("select count(*) from model_versions").fetchone()[0] == 1


@pytest.mark.slow
def test_evaluate_writes_metrics_with_protocol_card_and_per_case_rows(trained_lidc_run):
    out, data = trained_lidc_run["output_dir"], trained_lidc_run["dataset_dir"]
    result = run_bundle(
        "evaluating",
        ["train.json", "demo.json", "evaluate.json"],
        trained_lidc_run["home"],
        dataset_dir=data,
        output_dir=out,
        eval_ged_counts="[4,8]",
        eval_hm_iou_counts="[4]",
        eval_diversity_count=4,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    report_dir = out / "evaluation" / "test"
    report = json.loads((report_dir / "metrics.json").read_text())
    test_cases = load_lidc_datalist(data / "datalist.json", "test")
    assert report["num_cases"] == len(test_cases) and report["split"] == "test" and report["model"] == "CAR"
    hypothesis_keys = set(HYPOTHESIS_METRICS)
    crop_metrics = {"ged4", "ged8", "hm_iou4", "diversity4", "presence_gap", "speckle", "ece"}
    assert set(report["metrics"]) == crop_metrics | hypothesis_keys
    rows_metrics = {"ged4", "ged8", "hm_iou4", "diversity4", "presence_gap", "speckle"}
    assert set(report["references"]) == {
        "readers_oracle",
        "majority_vote",
        "f_threshold",
        "f_bernoulli",
        "readers_leave_one_out",
    }
    for row in ("readers_oracle", "f_threshold", "f_bernoulli"):
        assert set(report["references"][row]) == rows_metrics
    assert set(report["references"]["majority_vote"]) == rows_metrics | hypothesis_keys
    assert set(report["references"]["readers_leave_one_out"]) == hypothesis_keys
    assert set(report["protocol"]["reference_definitions"]) == set(report["references"])
    assert report["protocol"]["presence_min_area"] == 5 and report["protocol"]["speckle_size"] == 5
    card = report["protocol"]
    assert card["dataset"]["source"].startswith("DICOM crops") and card["dataset"]["split_seed"] == 0
    assert card["dataset"]["counts"]["test"]["cases"] == len(test_cases)
    assert "both masks empty: IoU = 1" in card["metric_definitions"]["distance"]
    with open(report_dir / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["patient_id"] for row in rows] == [item["patient_id"] for item in test_cases]
    assert np.mean([float(row["ged8"]) for row in rows]) == pytest.approx(report["metrics"]["ged8"], abs=1e-5)
    assert np.mean([float(row["majority_vote_ged8"]) for row in rows]) == pytest.approx(
        report["references"]["majority_vote"]["ged8"], abs=1e-5
    )
    assert (report_dir / "reliability.png").stat().st_size > 0 and (report_dir / "montage.png").stat().st_size > 0
    assert (report_dir / "presence.png").stat().st_size > 0
    # each nodule's crops as one volume, with the noise shared by its crops
    assert card["noise"] == "nodule" and card["volume_samples"] == 4
    assert {"ged4_3d", "hm_iou4_3d", "adjacent_dice", "readers_adjacent_dice", "num_nodules"} == set(report["volumes"])
    with open(report_dir / "per_nodule.csv") as handle:
        nodules = list(csv.DictReader(handle))
    assert (
        len(nodules)
        == report["volumes"]["num_nodules"]
        == len({(r["patient_id"], r["series_uid"], r["nodule_id"]) for r in rows})
    )
    assert sum(int(n["num_slices"]) for n in nodules) == len(rows)
    # the nodules' hypotheses against the readers (issue 28): the model's, the majority vote's, the leave-one-out's
    assert card["hypothesis_min_iou"] == 0.5 and card["hypothesis_bins"] == 10
    assert {"hypothesis_ece", "hypotheses", "readers_leave_one_out"} <= set(card["metric_definitions"]) | set(
        card["reference_definitions"]
    )
    scored = {"CAR": report["metrics"], **{row: report["references"][row] for row in HYPOTHESIS_REFERENCE_ROWS}}
    for values in scored.values():
        shares = ("hypothesis_ece", "hypothesis_coverage", "hypothesis_uncovered", "hypothesis_unmatched")
        assert all(0.0 <= values[k] <= 1.0 for k in shares)
        assert values["hypothesis_coverage"] + values["hypothesis_uncovered"] == pytest.approx(1.0)
        assert values["hypothesis_unmatched"] <= values["hypothesis_uncovered"] + 1e-12
    assert report["references"]["majority_vote"]["hypotheses_per_nodule"] == 1.0
    assert 1.0 <= report["metrics"]["hypotheses_per_nodule"] <= card["volume_samples"]
    curves = report["hypothesis_reliability"]
    assert set(curves) == {"CAR", "majority vote", "readers' leave-one-out"}
    num_nodules = report["volumes"]["num_nodules"]
    assert curves["CAR"]["num_lesions"] == curves["majority vote"]["num_lesions"] == num_nodules
    # one trial per nodule and held-out reader slot, each scoring that slot alone against the other slots' shares
    slots = len(test_cases[0]["label"])  # R reader slots per crop (an empty slot counts as a reader)
    loo = curves["readers' leave-one-out"]
    assert loo["num_lesions"] == loo["num_readers"] == slots * num_nodules
    assert curves["CAR"]["num_readers"] == slots * num_nodules
    # with R - 1 = 3 slots grouped, every probability is 1/3, 2/3 or 1: only the bins holding those are filled
    filled = {i for i, c in enumerate(loo["count"]) if c}
    assert filled <= {3, 6, 9}
    assert sum(loo["count"]) == pytest.approx(loo["hypotheses_per_lesion"] * loo["num_lesions"])
    # the per-nodule rows add up to the coverage
    covered = sum(float(n["readers_covered"]) for n in nodules)
    assert covered / (slots * num_nodules) == pytest.approx(report["metrics"]["hypothesis_coverage"])
    assert np.mean([float(n["hypotheses"]) for n in nodules]) == pytest.approx(
        report["metrics"]["hypotheses_per_nodule"]
    )
    assert (report_dir / "hypotheses_reliability.png").stat().st_size > 0
    with sqlite3.connect(out / "mlflow.db") as db:
        logged = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"presence_gap", "ref_majority_vote_ged8", "ref_readers_oracle_hm_iou4", "ref_f_bernoulli_speckle"} <= logged
    assert {"hypothesis_ece", "ref_majority_vote_hypothesis_uncovered", "ref_readers_leave_one_out_hypothesis_ece"} <= (
        logged
    )
    assert set(report["presence_reliability"]) == {"CAR", "readers' oracle", "majority vote", "F > 0.5", "F Bernoulli"}
    assert len(report["reliability"]["count"]) == 10 and sum(report["reliability"]["count"]) == len(rows) * int(
        np.prod(card["roi_size"])
    )


@pytest.mark.slow
def test_2d_metrics_draw_per_crop_whatever_the_3d_noise(trained_lidc_run, tmp_path):
    """The 2D metrics keep the literature's per-crop draw; only the 3D metrics take a nodule's shared draw."""
    from car_med.evaluation import LidcEvaluationSettings, evaluate_lidc
    from car_med.networks import build_network

    bundle = json.loads((BUNDLE / "train.json").read_text())
    demo = json.loads((BUNDLE / "demo.json").read_text())
    specs = {}
    for name in ("calibration_network_spec", "refinement_network_spec"):
        specs[name] = {**bundle[name], **{k.split("#")[1]: v for k, v in demo.items() if k.startswith(name + "#")}}
    reports = {
        noise: evaluate_lidc(
            build_network(specs["calibration_network_spec"]),
            build_network(specs["refinement_network_spec"]),
            trained_lidc_run["dataset_dir"] / "datalist.json",
            tmp_path / noise,
            checkpoint=trained_lidc_run["output_dir"] / "checkpoints" / "best_stage2.pt",
            settings=LidcEvaluationSettings(
                ged_counts=(4,), hm_iou_counts=(4,), diversity_count=4, volume_samples=4, roi_size=ROI, noise=noise
            ),
            progress=False,
        )
        for noise in ("case", "nodule")
    }
    # the hypothesis numbers are taken on the 3D draw, like the volumes; every 2D number is the same
    two_d = {
        noise: {k: v for k, v in r["metrics"].items() if k not in HYPOTHESIS_METRICS} for noise, r in reports.items()
    }
    assert len(two_d["case"]) == len(reports["case"]["metrics"]) - len(HYPOTHESIS_METRICS)
    assert two_d["case"] == pytest.approx(two_d["nodule"], abs=1e-12)
    assert reports["case"]["references"] == reports["nodule"]["references"]  # the readers' rows need no draw
    assert [r["protocol"]["noise"] for r in reports.values()] == ["case", "nodule"]
    assert reports["case"]["volumes"]["num_nodules"] == reports["nodule"]["volumes"]["num_nodules"] > 0
    # a nodule of several slices gets other noise on every slice but its first, so its 3D scores move
    per_nodule = {}
    for noise in reports:
        with open(tmp_path / noise / "per_nodule.csv") as handle:
            per_nodule[noise] = {(r["patient_id"], r["nodule_id"]): r for r in csv.DictReader(handle)}
    several = [k for k, r in per_nodule["case"].items() if int(r["num_slices"]) > 1]
    assert several
    assert any(per_nodule["case"][k]["ged4_3d"] != per_nodule["nodule"][k]["ged4_3d"] for k in several)
    with pytest.raises(ValueError, match="noise must be one of"):
        LidcEvaluationSettings(noise="slice")


@pytest.mark.slow
def test_inference_writes_one_npz_per_case_in_the_scanner_frame(trained_lidc_run):
    out, data = trained_lidc_run["output_dir"], trained_lidc_run["dataset_dir"]
    result = run_bundle(
        "inference",
        ["train.json", "demo.json", "inference.json"],
        trained_lidc_run["home"],
        dataset_dir=data,
        output_dir=out,
        inference_num_samples=5,
        inference_max_cases=2,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    folder = out / "inference" / "test"
    with open(folder / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == ["case_000000.npz", "case_000001.npz"]
    case = np.load(folder / rows[0]["file"])
    assert case["samples"].shape == (5, *ROI) and case["samples"].dtype == np.uint8
    assert case["mean"].shape == case["calibration"].shape == (2, *ROI)
    np.testing.assert_allclose(case["calibration"].sum(axis=0), 1.0, atol=1e-5)
    assert case["entropy"].shape == ROI and case["affine"].shape == (4, 4)
    assert abs(case["affine"][0, 0]) == pytest.approx(0.5)  # 0.5 mm pixels, as preprocessing resamples


@pytest.mark.filterwarnings("ignore:No hash value provided")  # the schema is a file of this repository
def test_metadata_verifies_offline_and_networks_match_it():
    """What ``python -m monai.bundle verify_metadata`` and ``verify_net_in_out`` run, called in this process (three
    interpreters would spend ~25 s importing MONAI); each raises on a mismatch."""
    from monai.bundle import verify_metadata, verify_net_in_out

    meta = str(BUNDLE / "metadata.json")
    # the schema is the bundle's own copy: nothing is downloaded
    verify_metadata(meta_file=meta, filepath=str(BUNDLE / "schema" / "meta_schema.json"))
    configs = [str(BUNDLE / "train.json"), str(BUNDLE / "demo.json")]
    for net in ("calibration_network", "sample_network"):
        verify_net_in_out(net_id=net, meta_file=meta, config_file=configs, device="cpu", n=4)
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(
            net_id="calibration_network", meta_file=meta, config_file=configs, device="cpu", n=4,
            **{"calibration_network_spec#out_channels": 3},
        )  # fmt: skip


@pytest.mark.slow
def test_training_with_f_on_the_readers_shares_runs_end_to_end(tmp_path, clean_run):
    """The fidelity benchmark's settings (benchmarks/lidc_quality.json): F on the readers' shares with instance
    norm, and the sampler's small-component cleanup in validation."""
    out = tmp_path / "run"
    result = run_bundle(
        "training", ["train.json", "demo.json"], tmp_path / "home", dataset_dir=clean_run, output_dir=out,
        f_target="readers_mean", **{"calibration_network_spec#norm": "instance"}, register_model="False",
        sampler_min_component_size=5,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    with sqlite3.connect(out / "mlflow.db") as db:
        params = dict(db.execute("select key, value from params").fetchall())
    assert params["f_target"] == "readers_mean" and params["f_norm"] == "instance"
    assert params["sampler_min_component_size"] == "5"
    # a G of 6 iterations draws speckle; validation scores the cleaned samples, which hold none
    assert json.loads((out / "validation.json").read_text())["last"]["speckle"] == 0.0
    bad = run_bundle("training", ["train.json", "demo.json"], tmp_path / "home", dataset_dir=clean_run,
                     output_dir=tmp_path / "bad", f_target="mean")  # fmt: skip
    assert bad.returncode != 0 and "f_target must be one of ['one_reader', 'readers_mean']" in bad.stdout
