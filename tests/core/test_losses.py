"""CAR's losses: L_cal, the adversarial pair, R1 and the pixelwise CE."""

from __future__ import annotations

import math

import pytest
import torch

from car_med.losses import (
    categorical_calibration_loss,
    discriminator_loss,
    gaussian_calibration_loss,
    generator_adversarial_loss,
    pixelwise_cross_entropy,
    r1_penalty,
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


def test_adversarial_losses_match_bce_formulas():
    real = torch.tensor([[2.0], [-1.0]])
    fake = torch.tensor([[0.5], [-3.0]])
    sig = torch.sigmoid
    expected_g = -torch.log(sig(fake)).mean()
    expected_d = -torch.log(sig(real)).mean() - torch.log(1 - sig(fake)).mean()
    assert generator_adversarial_loss(fake).item() == pytest.approx(expected_g.item(), rel=1e-6)
    assert discriminator_loss(real, fake).item() == pytest.approx(expected_d.item(), rel=1e-6)


def test_r1_equals_hand_computed_value():
    # D(y) = w . y  (linear), so dD/dy = w for every sample: R1 = gamma * ||w||^2.
    w = torch.tensor([1.0, -2.0, 0.5])
    y = torch.tensor([[0.3, 0.1, 0.9], [1.0, 0.0, 0.0]], requires_grad=True)
    logits = (y * w).sum(dim=1, keepdim=True)
    assert r1_penalty(logits, y, gamma=10.0).item() == pytest.approx(10.0 * 5.25)
    logits = (y * w).sum(dim=1, keepdim=True)
    assert r1_penalty(logits, y, gamma=10.0, half=True).item() == pytest.approx(5.0 * 5.25)
    # D(y) = sum(y^2): grad 2y; per-sample squared norms 4*0.91 and 4*1.0, mean 3.82, times gamma 2
    logits = (y**2).sum(dim=1, keepdim=True)
    assert r1_penalty(logits, y, gamma=2.0).item() == pytest.approx(2.0 * 3.82)


def test_r1_requires_grad_inputs():
    y = torch.ones(2, 3)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(torch.zeros(2, 1, requires_grad=True), y)


def test_pixelwise_cross_entropy_ignore_index_and_channel_first_labels():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = 5.0
    labels = torch.tensor([[[[0, 1], [24, 24]]]])
    loss = pixelwise_cross_entropy(logits, labels, ignore_index=24)
    log_norm = math.log(math.exp(5) + 2)
    expected = ((log_norm - 5.0) + log_norm) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pixelwise_cross_entropy_rejects_bad_labels():
    logits = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"label values must be in \[0, 1\]"):
        pixelwise_cross_entropy(logits, torch.full((1, 1, 2, 2), 3))
    with pytest.raises(ValueError, match=r"expected one class-index map per image"):
        pixelwise_cross_entropy(logits, torch.zeros(1, 1, 3, 3, dtype=torch.long))
