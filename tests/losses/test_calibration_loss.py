"""L_cal: KL(Gbar || F) with clamp and valid mask, and its Gaussian form (car_med.losses.calibration)."""

from __future__ import annotations

import math

import pytest
import torch

from car_med.losses import (
    categorical_calibration_loss,
    gaussian_calibration_loss,
)


def _random_probs(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(*shape, generator=g), dim=-3)


def test_calibration_loss_zero_when_mean_of_samples_equals_f():
    f = _random_probs(2, 3, 8, 8)
    # M samples whose mean is exactly F: F +/- a class-sum-zero perturbation
    delta = 0.05 * torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1) * f.min()
    samples = torch.stack([f + delta, f - delta], dim=1)
    assert categorical_calibration_loss(samples, f).item() == pytest.approx(0.0, abs=1e-7)


def test_calibration_loss_positive_and_equals_kl_otherwise():
    f = _random_probs(2, 3, 8, 8, seed=1)
    samples = _random_probs(2, 4, 3, 8, 8, seed=2)
    loss = categorical_calibration_loss(samples, f, clamp=1e-3)
    gbar = samples.mean(1).clamp(1e-3, 1 - 1e-3)
    fc = f.clamp(1e-3, 1 - 1e-3)
    expected = (gbar * (gbar / fc).log()).sum(1).mean()
    assert loss.item() > 1e-3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_calibration_loss_valid_mask_averages_only_valid_pixels():
    f = _random_probs(1, 2, 4, 4, seed=3)
    samples = _random_probs(1, 3, 2, 4, 4, seed=4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    masked = categorical_calibration_loss(samples, f, valid_mask=mask)
    gbar = samples.mean(1).clamp(1e-3, 1 - 1e-3)
    kl = (gbar * (gbar / f.clamp(1e-3, 1 - 1e-3)).log()).sum(1)
    assert masked.item() == pytest.approx(kl[0, :2].mean().item(), rel=1e-6)


def test_calibration_loss_never_trains_f():
    f_logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    g = torch.randn(1, 3, 2, 4, 4, requires_grad=True)
    categorical_calibration_loss(torch.softmax(g, 2), torch.softmax(f_logits, 1)).backward()
    assert f_logits.grad is None
    assert g.grad.abs().sum() > 0


def test_gaussian_calibration_loss_is_half_mse_of_sample_mean():
    samples = torch.tensor([[[1.0], [3.0]], [[0.0], [0.0]]])  # means 2 and 0
    target = torch.tensor([[1.0], [1.0]])
    # 0.5 * mean((2-1)^2, (0-1)^2) = 0.5
    assert gaussian_calibration_loss(samples, target).item() == pytest.approx(0.5)


def test_calibration_loss_clamps_f_at_exactly_zero_and_one():
    # F certain (0 / 1) on every pixel, G's mean at 0.5: without the clamp the KL would be infinite
    f = torch.zeros(1, 2, 3, 3)
    f[:, 1] = 1.0
    samples = torch.full((1, 4, 2, 3, 3), 0.5, requires_grad=True)
    loss = categorical_calibration_loss(samples, f, clamp=1e-3)
    expected = 0.5 * math.log(0.5 / 1e-3) + 0.5 * math.log(0.5 / (1 - 1e-3))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(samples.grad).all()
    # G's mean at exactly 0 / 1 where F agrees: clamped on both sides, so zero loss and finite gradient
    agree = f.clone()[:, None].repeat(1, 2, 1, 1, 1).requires_grad_(True)
    loss = categorical_calibration_loss(agree, f, clamp=1e-3)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(agree.grad).all()


@pytest.mark.parametrize("clamp", [1e-2, 1e-4])
def test_calibration_loss_clamp_is_the_argument(clamp):
    f = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    samples = torch.tensor([0.5, 0.5]).view(1, 1, 2, 1, 1)
    expected = 0.5 * math.log(0.5 / (1 - clamp)) + 0.5 * math.log(0.5 / clamp)
    assert float(categorical_calibration_loss(samples, f, clamp=clamp)) == pytest.approx(expected, rel=1e-6)
