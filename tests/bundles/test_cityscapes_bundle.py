"""The Cityscapes bundle end to end: tiny CAR, cGAN+L_ce and cGAN+L_cal(gt) trainings and their evaluation, each
a ``python -m monai.bundle run`` subprocess on a synthetic tree preprocessed at 64x128."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from cityscapes_runs import BUNDLE, TINY_EVAL, make_synthetic_dataset, run_cityscapes_bundle

TRAIN = ["train.json", "demo.json"]


@pytest.fixture(scope="module")
def cityscapes_data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("cityscapes_data"))


def _train(tmp_path_factory, data, name, extra=(), overrides=None):
    out = tmp_path_factory.mktemp(f"cityscapes_{name}")
    home = tmp_path_factory.mktemp(f"cityscapes_{name}_home")
    result = run_cityscapes_bundle(
        "training", [*TRAIN, *extra], home, dataset_dir=data, output_dir=out, **(overrides or {})
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return {"output_dir": out, "home": home, "log": result.stdout, "configs": [*TRAIN, *extra]}


@pytest.fixture(scope="module")
def car_run(tmp_path_factory, cityscapes_data):
    # four stage-2 iterations validated after each, so that the best checkpoint is a choice among four
    return _train(tmp_path_factory, cityscapes_data, "car", overrides={"stage2_iterations": 4, "val_interval": 1})


def _evaluate(run, data):
    result = run_cityscapes_bundle(
        "evaluating",
        [*run["configs"], "evaluate.json"],
        run["home"],
        dataset_dir=data,
        output_dir=run["output_dir"],
        **TINY_EVAL,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    folder = run["output_dir"] / "evaluation" / "test"
    return json.loads((folder / "metrics.json").read_text()), folder


@pytest.mark.slow
def test_car_training_runs_both_stages_and_leaves_checkpoints(car_run):
    checkpoints = car_run["output_dir"] / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert any(n.startswith("stage1") for n in names), names
    assert any(n.startswith("stage2") for n in names), names
    assert "best_stage2.pt" in names
    stage2 = torch.load(next(checkpoints.glob("stage2_checkpoint_*.pt")), weights_only=True, map_location="cpu")
    assert stage2["trainer"]["iteration"] == 4
    # F is the black-box-conditioned net: its first convolution reads 3 image + 25 black-box channels
    first = next(v for k, v in stage2["calibration_network"].items() if k.endswith("conv.weight"))
    assert first.shape[1] == 3 + 25
    assert (car_run["output_dir"] / "mlflow.db").is_file()


@pytest.mark.slow
def test_the_best_checkpoint_is_the_validation_with_the_lowest_val_key_metric(car_run):
    # demo.json picks best_stage2.pt by G's mean calibration offset (train.json's default is GED)
    history = json.loads((car_run["output_dir"] / "validation.json").read_text())
    assert history["key_metric"] == "g_mean_offset"
    entries = history["history"]
    assert [e["iteration"] for e in entries] == [1, 2, 3, 4]
    best = min(entries, key=lambda e: e["g_mean_offset"])
    assert history["best"] == pytest.approx(best["g_mean_offset"])
    assert history["best_iteration"] == best["iteration"]
    # the validation also measures whether G uses its noise (G's probabilities reach the suite)
    assert all(0.0 < e["g_noise_response"] <= 1.2 for e in entries), [e["g_noise_response"] for e in entries]


def test_train_json_picks_the_best_checkpoint_by_ged_unless_told_otherwise():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "train.json"))
    assert parser.get_parsed_content("val_key_metric") == "ged16"
    parser.read_config([str(BUNDLE / "train.json"), str(BUNDLE / "demo.json")])
    assert parser.get_parsed_content("val_key_metric") == "g_mean_offset"


@pytest.mark.slow
def test_car_evaluation_writes_finite_in_range_metrics_and_figures(car_run, cityscapes_data):
    report, folder = _evaluate(car_run, cityscapes_data)
    m = report["metrics"]
    assert report["model"] == "CAR" and report["num_cases"] == 4
    assert 0.0 <= m["ged4"] <= 2.0 and 0.0 <= m["diversity4"] <= 1.0
    for key in ("f_mean_offset", "g_mean_offset", "ece"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert len(report["class_calibration"]) == 5
    for row in report["class_calibration"]:
        assert 0.0 <= row["f"] <= 1.0 and 0.0 <= row["g"] <= 1.0
        # a standard deviation of probabilities is at most 0.5; the reference is the one-hot sampler's
        assert 0.0 <= row["g_spread"] <= 0.5
        assert row["reference_spread"] == pytest.approx(math.sqrt(row["true"] * (1 - row["true"])))
    assert 0.0 < m["g_noise_response"] <= 1.2
    protocol = report["protocol"]
    assert protocol["absent_class"] == "skip" and protocol["f_calibration_pixels"] == "blackbox_correct"
    assert abs(protocol["mode_weights_sum"] - 1.0) < 1e-12
    assert protocol["dataset"]["counts"] == {"training": 6, "validation": 6, "test": 6}
    assert "absent_class" in protocol["metric_definitions"]
    for name in ("reliability.png", "class_calibration.png", "per_case.csv"):
        assert (folder / name).stat().st_size > 0
    with open(folder / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(math.isfinite(float(r["ged4"])) for r in rows)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{car_run['output_dir'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("car_cityscapes")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'CAR evaluate-test'")
    assert len(runs) == 1 and abs(runs[0].data.metrics["ged4"] - m["ged4"]) < 1e-9
    assert abs(runs[0].data.metrics["g_noise_response"] - m["g_noise_response"]) < 1e-9


@pytest.mark.slow
def test_baseline_ce_trains_and_evaluates(tmp_path_factory, cityscapes_data):
    run = _train(tmp_path_factory, cityscapes_data, "ce", ["train_baseline_ce.json"])
    assert "loss_ce" in run["log"] or (run["output_dir"] / "checkpoints").is_dir()
    report, _ = _evaluate(run, cityscapes_data)
    assert report["model"] == "cGAN+L_ce"
    assert math.isfinite(report["metrics"]["ged4"])


@pytest.mark.slow
def test_gt_conditioned_trains_without_stage1_and_its_f_is_exactly_calibrated(tmp_path_factory, cityscapes_data):
    run = _train(tmp_path_factory, cityscapes_data, "gt", ["train_gt_conditioned.json"])
    names = sorted(p.name for p in (run["output_dir"] / "checkpoints").iterdir())
    assert not any(n.startswith("stage1") for n in names), names
    assert any(n.startswith("stage2") for n in names), names
    report, _ = _evaluate(run, cityscapes_data)
    assert report["model"] == "cGAN+L_cal(gt)"
    # F is the analytic label distribution: its flip probabilities are the true ones
    assert report["metrics"]["f_mean_offset"] < 1e-6
    assert math.isfinite(report["metrics"]["ged4"])
