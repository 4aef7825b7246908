"""The MLflow glue of the bundles: which engine outputs become metrics, under which names, how often."""

from __future__ import annotations

import math

import pytest
import torch

from car_med.engines.keys import CARKeys
from car_med.handlers import LossesForTracking, every_n_iterations, sqlite_tracking_uri


def _stage2_output() -> dict:
    return {
        CARKeys.LOSS: torch.tensor(1.5),  # MONAI's total loss: repeats loss_g
        CARKeys.LOSS_G: torch.tensor(1.5),
        CARKeys.LOSS_ADV: torch.tensor(0.75),
        CARKeys.LOSS_CAL: 0.25,
        CARKeys.LOSS_D: torch.tensor([0.5]),
        CARKeys.D_ACCURACY: 0.625,
        CARKeys.D_STEPPED: True,
        CARKeys.PRED: torch.rand(2, 2, 4, 4),  # not a loss: left out
        CARKeys.SAMPLES: torch.rand(2, 3, 4, 4),
    }


def test_stage2_losses_keep_their_names_and_the_repeated_total_is_dropped():
    tracked = LossesForTracking()(_stage2_output())
    expected = {"loss_g": 1.5, "loss_adv": 0.75, "loss_cal": 0.25, "loss_d": 0.5, "d_accuracy": 0.625}
    assert tracked == {**expected, "d_stepped": 1.0}  # whether D stepped, as 0/1 for MLflow's curves
    assert all(type(value) is float for value in tracked.values())


def test_stage1_renames_its_single_loss():
    assert LossesForTracking({"loss": "loss_f"})({"loss": torch.tensor(0.125), "pred": torch.zeros(1)}) == {
        "loss_f": 0.125
    }
    # without loss_g beside it, the plain loss is kept under its own name
    assert LossesForTracking()({"loss": 2.0}) == {"loss": 2.0}


def test_a_renamed_total_is_kept_even_beside_loss_g():
    tracked = LossesForTracking({"loss": "loss_total"})({"loss": 3.0, "loss_g": 3.0})
    assert tracked == {"loss_total": 3.0, "loss_g": 3.0}


def test_non_scalar_and_non_finite_values_are_left_out():
    output = {"loss_g": torch.tensor([1.0, 2.0]), "loss_d": math.nan, "loss_adv": torch.tensor(math.inf), "loss_r1": 4}
    assert LossesForTracking()(output) == {"loss_r1": 4.0}
    assert LossesForTracking()({"loss_g": math.nan}) is None  # nothing left: no metrics at all


def test_a_decollated_output_is_read_from_its_first_item():
    items = [{"loss_g": torch.tensor(0.5), "pred": torch.zeros(2)}, {"loss_g": torch.tensor(0.5)}]
    assert LossesForTracking()(items) == {"loss_g": 0.5}
    assert LossesForTracking()([]) is None
    assert LossesForTracking()(torch.tensor(1.0)) is None


def test_every_n_iterations_lets_through_multiples_of_n_only():
    keep = every_n_iterations(5)
    assert [event for event in range(1, 21) if keep(None, event)] == [5, 10, 15, 20]
    assert all(every_n_iterations(1)(None, event) for event in range(1, 4))
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        every_n_iterations(0)


def test_sqlite_tracking_uri_is_absolute_and_creates_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = sqlite_tracking_uri("runs/new")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'runs' / 'new' / 'mlflow.db'}"
    assert (tmp_path / "runs" / "new").is_dir()
