"""The end of LIDC training: the best stage-2 weights go to the MLflow registry once, a finished rerun registers
nothing, and new weights make a new version."""

from __future__ import annotations

import json
import os

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from tiny_car import make_tiny_nets

from car_med.handlers import register_trained_model
from car_med.handlers.registration import REGISTRATION_FILE

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # MLflow's own SQLAlchemy use

NOISE_DIM = 4
F_SPEC = {
    "target": "car_med.networks.SegNetCalibrationNet",
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16],
    "convs_per_block": [1, 1],
    "dropout": 0.0,
}
G_SPEC = {
    "target": "car_med.networks.NoiseInjectedUNet",
    "image_channels": 1,
    "num_classes": 2,
    "noise_dim": NOISE_DIM,
    "channels": [8, 16, 16, 16],
    "dropout": 0.0,
}


def _stage2_checkpoint(path, seed: int, validation: dict | None) -> dict[str, dict]:
    """A stage-2 checkpoint with F and G of ``seed``; returns its state dicts."""
    f, g, _ = make_tiny_nets(seed=seed, noise_dim=NOISE_DIM)
    state = {"calibration_network": f.state_dict(), "refinement_network": g.state_dict()}
    torch.save({**state, **({"validation": validation} if validation else {})}, path)
    return state


def _register(tmp_path, best, final, **kwargs):
    f, g, _ = make_tiny_nets(seed=0, noise_dim=NOISE_DIM)
    record = register_trained_model(
        f, g, F_SPEC, G_SPEC, best, final, tmp_path / "run", "car-test", f"sqlite:///{tmp_path / 'mlflow.db'}",
        **kwargs,
    )  # fmt: skip
    return record, f, g


def _registered_weights(tmp_path, version: int) -> dict:
    folder = mlflow.artifacts.download_artifacts(f"models:/car-test/{version}", dst_path=str(tmp_path / f"v{version}"))
    (weights,) = [
        os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.endswith(".pt")
    ]
    return torch.load(weights, weights_only=True)


def _versions(tmp_path) -> list[int]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return sorted(int(v.version) for v in client.search_model_versions("name = 'car-test'"))


def _same_state(saved: dict, expected: dict) -> bool:
    return saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)


@pytest.mark.slow  # MLflow logs a model in about 5 s
def test_the_best_checkpoint_is_registered_once_and_new_weights_make_a_new_version(tmp_path):
    (tmp_path / "run").mkdir()
    validation = {"iteration": 6, "metric": "ged16", "value": 0.25}
    best = _stage2_checkpoint(tmp_path / "best.pt", seed=1, validation=validation)
    _stage2_checkpoint(tmp_path / "final.pt", seed=2, validation=None)

    record, f, g = _register(tmp_path, tmp_path / "best.pt", tmp_path / "final.pt", dataset_dir=tmp_path / "nowhere")
    assert record["model_name"] == "car-test" and record["version"] == 1
    assert record["weights"] == str(tmp_path / "best.pt") and record["validation"] == validation
    assert json.loads((tmp_path / "run" / REGISTRATION_FILE).read_text()) == record
    # the networks handed in now hold the best checkpoint's weights, and so does the registered model
    assert _same_state(f.state_dict(), best["calibration_network"])
    assert _same_state(g.state_dict(), best["refinement_network"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the autouse HOME fixture forgets it
    info = mlflow.models.get_model_info("models:/car-test/1")
    extra = info.metadata["extra_metadata"]
    assert extra["weights"] == "best.pt" and extra["validation"] == validation
    assert "error" in extra["dataset"]  # a dataset folder without a datalist is named, not fatal
    registered = _registered_weights(tmp_path, 1)
    assert any(_same_state(part, best["refinement_network"]) for part in registered.values())

    # a rerun of the finished training finds the record: nothing new
    again, _, _ = _register(tmp_path, tmp_path / "best.pt", tmp_path / "final.pt")
    assert again == record and _versions(tmp_path) == [1]

    # a training that wrote another best checkpoint registers it as version 2
    newer = _stage2_checkpoint(tmp_path / "best.pt", seed=3, validation={**validation, "value": 0.125})
    os.utime(tmp_path / "best.pt", ns=(record["weights_mtime_ns"] + 10**9,) * 2)
    second, _, g = _register(tmp_path, tmp_path / "best.pt", tmp_path / "final.pt")
    assert second["version"] == 2 and second["validation"]["value"] == 0.125 and _versions(tmp_path) == [1, 2]
    assert _same_state(g.state_dict(), newer["refinement_network"])


@pytest.mark.slow
def test_without_a_best_checkpoint_the_last_one_is_registered(tmp_path):
    final = _stage2_checkpoint(tmp_path / "final.pt", seed=2, validation=None)
    record, f, _ = _register(tmp_path, tmp_path / "no_best.pt", tmp_path / "final.pt")
    assert record["weights"] == str(tmp_path / "final.pt") and record["validation"] is None
    assert _same_state(f.state_dict(), final["calibration_network"])


def test_no_checkpoint_at_all_names_both_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no stage-2 checkpoint to register") as raised:
        _register(tmp_path, tmp_path / "best.pt", None)
    assert str(tmp_path / "best.pt") in str(raised.value)
    assert not (tmp_path / "run" / REGISTRATION_FILE).exists()
