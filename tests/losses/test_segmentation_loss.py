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
