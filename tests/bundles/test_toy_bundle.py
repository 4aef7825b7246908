"""The toy bundle runs end to end with MLflow tracking, its inference overlay samples, and the demo reports."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "toy"
INFERENCE = [str(BUNDLE / "train.json"), str(BUNDLE / "inference.json")]


@pytest.mark.slow  # four bundle runs: training, inference, a rerun and a refused resume
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

    run("inference", config_file=INFERENCE, output_dir=str(out), logging_file=False, inference_points=25, **small)
    data = np.load(out / "samples.npz")
    assert data["x"].shape == (25,) and data["samples"].shape == (25, 100)
    assert data["calibration_target"].shape == (25,)
    assert data["x"][0] == 0.0 and data["x"][-1] == 1.0
    assert np.isfinite(data["samples"]).all() and data["samples"].std() > 0

    # a rerun finds both stages finished and trains nothing more
    before = (out / "checkpoints" / "stage2_checkpoint_epoch=2.pt").stat().st_mtime_ns
    run("training", config_file=str(BUNDLE / "train.json"), output_dir=str(out), logging_file=False, **small)
    assert (out / "checkpoints" / "stage2_checkpoint_epoch=2.pt").stat().st_mtime_ns == before

    # resuming with another architecture names the checkpoint entry and the first differing weight
    with pytest.raises(RuntimeError) as excinfo:
        run(
            "training",
            config_file=str(BUNDLE / "train.json"),
            output_dir=str(out),
            logging_file=False,
            hidden=32,
            **small,
        )
    cause = excinfo.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ValueError)
    assert "stage1_checkpoint_epoch=1.pt#calibration_network" in str(cause) and "wrong shape" in str(cause)
    assert "size mismatch" not in str(cause)


def test_toy_inference_without_training_says_what_to_do(tmp_path):
    from monai.bundle import run

    # MONAI's config parser wraps the error; the user sees ours as the cause, naming the folder
    with pytest.raises(RuntimeError) as excinfo:
        run("inference", config_file=INFERENCE, output_dir=str(tmp_path), logging_file=False)
    cause = excinfo.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert "run the toy training" in str(cause) and str(tmp_path) in str(cause)


@pytest.mark.slow
def test_demo_command_runs_the_bundle_and_reports(tmp_path, capsys):
    from car_med.experiments.toy_demo import main

    out = tmp_path / "demo"
    args = [
        "--output-dir",
        str(out),
        "--f_iterations",
        "20",
        "--gan_iterations_per_epoch",
        "10",
        "--gan_epochs",
        "1",
        "--likelihood_points",
        "32",
        "--log_every",
        "5",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fraction of samples below 0" in printed and "MLflow run" in printed and "loss_cal" in printed
    assert (out / "samples.png").stat().st_size > 10_000
    assert np.load(out / "samples.npz")["samples"].shape == (200, 100)
