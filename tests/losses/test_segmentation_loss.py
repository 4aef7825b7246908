"""Pixelwise CE with ignore index (car_med.losses.segmentation)."""

from __future__ import annotations

import math

import pytest
import torch

from car_med.losses import (
    pixelwise_cross_entropy,
)


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


def test_soft_target_cross_entropy_is_the_mean_of_the_readers_cross_entropies():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 5, 5)
    readers = (torch.rand(2, 4, 5, 5) > 0.5).long()
    per_reader = torch.stack([pixelwise_cross_entropy(logits, readers[:, r : r + 1]) for r in range(4)])
    shares = torch.nn.functional.one_hot(readers, 2).float().mean(1).movedim(-1, 1)  # (B, 2, H, W)
    assert pixelwise_cross_entropy(logits, shares).item() == pytest.approx(per_reader.mean().item(), rel=1e-6)
    assert pixelwise_cross_entropy(logits, shares.half()).item() == pytest.approx(per_reader.mean().item(), rel=1e-4)
    # its minimiser is F = the shares: the gradient vanishes there
    at_shares = shares.clamp(1e-6, 1).log().requires_grad_(True)
    pixelwise_cross_entropy(at_shares, shares).backward()
    assert at_shares.grad.abs().max() < 1e-6


def test_soft_target_must_be_class_shares():
    logits = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="sum to 1 over dim 1"):
        pixelwise_cross_entropy(logits, torch.full((1, 2, 2, 2), 0.7))
    with pytest.raises(ValueError, match="class-index targets only"):
        pixelwise_cross_entropy(logits, torch.full((1, 2, 2, 2), 0.5), ignore_index=24)
