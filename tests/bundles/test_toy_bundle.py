"""The toy data follow eq. 8 exactly, and the toy bundle runs end to end with MLflow tracking."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from car_med.data.toy import ToyBatchDataset, sample_toy, toy_expected_y, toy_log_likelihood

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "toy"


@pytest.mark.parametrize("pi", [0.5, 0.9])
def test_toy_data_mode_probability_and_mean(pi):
    x, y = sample_toy(40000, pi, 0.02, torch.Generator().manual_seed(0))
    first = x[:, 0] < 0.4
    assert float((y[first] < 0).float().mean()) == pytest.approx(pi, abs=0.01)
    assert float(y[first].mean()) == pytest.approx(0.5 - pi, abs=0.01)
    last = x[:, 0] >= 0.8
    assert float(y[last].std()) == pytest.approx(0.02, rel=0.05)


def test_toy_log_likelihood_is_a_normalised_density():
    ys = torch.linspace(-1.5, 1.5, 30001, dtype=torch.float64)[:, None]
    step = float(ys[1] - ys[0])
    for x0 in (0.1, 0.5, 0.9):
        x = torch.full_like(ys, x0)
        mass = float(toy_log_likelihood(x, ys, 0.7, 0.03).exp().sum()) * step
        assert mass == pytest.approx(1.0, abs=1e-6)
    # a single Gaussian on [0.8, 1]: log N(0; 0, 0.03)
    value = float(toy_log_likelihood(torch.tensor([[0.9]]), torch.tensor([[0.0]]), 0.7, 0.03))
    assert value == pytest.approx(-0.5 * math.log(2 * math.pi) - math.log(0.03), rel=1e-6)
    assert float(toy_expected_y(torch.tensor([[0.5]]), 0.9)) == pytest.approx((1 - 2 * 0.9) * (1 - 1.25 * 0.5))


def test_toy_batches_are_reproducible_and_reject_bad_parameters():
    ds = ToyBatchDataset(3, 5, 0.9, 0.03, seed=1)
    assert torch.equal(ds[2]["label"], ToyBatchDataset(3, 5, 0.9, 0.03, seed=1)[2]["label"])
    assert ds[0]["image"].shape == (5, 1)
    with pytest.raises(ValueError, match="pi"):
        ToyBatchDataset(1, 1, 1.5, 0.03)
    with pytest.raises(ValueError, match="sigma"):
        sample_toy(3, 0.5, 0.0)


def test_toy_bundle_trains_tracks_samples_and_resumes(tmp_path):
    import mlflow
    from monai.bundle import run

    warnings.filterwarnings("ignore", message="parsing config_file")
    out = tmp_path / "toy"
    small = dict(f_iterations=30, gan_iterations_per_epoch=15, gan_epochs=2, likelihood_points=64, log_every=5)
    run("training", config_file=str(BUNDLE / "train.json"), output_dir=str(out), logging_file=False, **small)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["stage1_checkpoint_epoch=1.pt", "stage2_checkpoint_epoch=2.pt"]
    curve = np.loadtxt(out / "likelihood.csv", delimiter=",", skiprows=1)
    assert curve.shape == (3, 2) and list(curve[:, 0]) == [10, 20, 30]

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["car_toy"])
    assert len(runs) == 1
    metrics = {c for c in runs.columns if c.startswith("metrics.")}
    assert {"metrics.loss_f", "metrics.loss_g", "metrics.loss_d", "metrics.loss_cal", "metrics.loss_adv"} <= metrics
    assert runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["params.lambda_cal"] == "1.0"

    run("inference", config_file=str(BUNDLE / "inference.json"), output_dir=str(out), logging_file=False, num_points=25)
    data = np.load(out / "samples.npz")
    assert data["x"].shape == (25,) and data["samples"].shape == (25, 100)
    assert data["calibration_target"].shape == (25,)
    assert data["x"][0] == 0.0 and data["x"][-1] == 1.0
    assert np.isfinite(data["samples"]).all() and data["samples"].std() > 0

    # a rerun finds both stages finished and trains nothing more
    before = (out / "checkpoints" / "stage2_checkpoint_epoch=2.pt").stat().st_mtime_ns
    run("training", config_file=str(BUNDLE / "train.json"), output_dir=str(out), logging_file=False, **small)
    assert (out / "checkpoints" / "stage2_checkpoint_epoch=2.pt").stat().st_mtime_ns == before


def test_toy_inference_without_training_says_what_to_do(tmp_path):
    from monai.bundle import run

    # MONAI's config parser wraps the error; the user sees ours as the cause, naming the folder
    with pytest.raises(RuntimeError) as excinfo:
        run("inference", config_file=str(BUNDLE / "inference.json"), output_dir=str(tmp_path), logging_file=False)
    cause = excinfo.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert "run the toy training" in str(cause) and str(tmp_path) in str(cause)


def test_demo_command_runs_the_bundle_and_reports(tmp_path, capsys):
    from car_med.experiments.demo import main

    out = tmp_path / "demo"
    args = ["--output-dir", str(out), "--f_iterations", "20", "--gan_iterations_per_epoch", "10", "--gan_epochs", "1",
            "--likelihood_points", "32", "--log_every", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fraction of samples below 0" in printed and "MLflow run" in printed and "loss_cal" in printed
    assert (out / "samples.png").stat().st_size > 10_000
    assert np.load(out / "samples.npz")["samples"].shape == (200, 100)
