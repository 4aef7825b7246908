"""The toy data follow eq. 8 exactly (car_med.data.toy)."""

from __future__ import annotations

import math

import pytest
import torch

from car_med.data.toy import ToyBatchDataset, sample_toy, toy_expected_y, toy_log_likelihood


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
