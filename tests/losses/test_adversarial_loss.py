"""Non-saturating L_adv, D's BCE and R1 (car_med.losses.adversarial)."""

from __future__ import annotations

import pytest
import torch

from car_med.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    r1_penalty,
)


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
