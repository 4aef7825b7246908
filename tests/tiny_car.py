"""Tiny CAR networks and an ambiguous synthetic segmentation task shared by the core tests."""

from __future__ import annotations

import pytest
import torch

from car_med.networks import Discriminator, NoiseInjectedUNet, SegNetCalibrationNet


def make_tiny_nets(seed: int = 0, noise_dim: int = 4):
    torch.manual_seed(seed)
    f = SegNetCalibrationNet(in_channels=1, out_channels=2, channels=(8, 16), convs_per_block=(1, 1), dropout=0.0)
    g = NoiseInjectedUNet(image_channels=1, num_classes=2, noise_dim=noise_dim, channels=(8, 16, 16, 16), dropout=0.0)
    d = Discriminator(image_channels=1, num_classes=2, channels=(8, 16))
    return f, g, d


def ambiguous_discs(num: int, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Bright discs; annotator 0 outlines the inner disc, annotator 1 a larger one (real ambiguity)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    items = []
    for _ in range(num):
        cy, cx = (torch.randint(10, size - 10, (2,), generator=g)).tolist()
        radius = float(torch.randint(4, 7, (1,), generator=g))
        dist = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
        image = (dist < radius).float() + 0.5 * ((dist >= radius) & (dist < radius + 2)).float()
        image = image + 0.05 * torch.randn(size, size, generator=g)
        labels = torch.stack([(dist < radius), (dist < radius + 2)]).long()
        items.append({"image": image[None], "labels": labels})
    return items


@pytest.fixture
def tiny_nets():
    return make_tiny_nets()
