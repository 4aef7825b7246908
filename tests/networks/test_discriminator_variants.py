"""Discriminator(full_resolution_convs=...): the authors' full-resolution stem as an option; the default D unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from car_med.networks import Discriminator


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_default_discriminator_has_no_full_resolution_stem_and_keeps_its_keys():
    d = Discriminator()
    assert len(d.stem) == 0
    assert not any(k.startswith("stem") for k in d.state_dict())
    assert _convs(d)[0].stride == (2, 2)


def test_authors_stem_is_three_64_channel_full_resolution_convs_with_reflection_padding():
    d = Discriminator(image_channels=1, num_classes=2, full_resolution_convs=3)
    stem = _convs(d.stem)
    assert [(c.in_channels, c.out_channels) for c in stem] == [(3, 64), (64, 64), (64, 64)]
    assert all(c.stride == (1, 1) and c.kernel_size == (3, 3) and c.padding_mode == "reflect" for c in stem)
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in d.stem) == 3
    # the stride-2 stack then starts from the stem's width
    assert _convs(d.features)[0].in_channels == 64
    shapes = []
    d.stem.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    out = d(torch.rand(2, 1, 40, 36), torch.rand(2, 2, 40, 36))
    assert out.shape == (2, 1)
    assert shapes == [(2, 64, 40, 36)]  # still full resolution


@pytest.mark.parametrize("size", [(128, 128), (180, 180)])
def test_authors_variant_is_size_agnostic_and_differentiable_for_r1(size):
    torch.manual_seed(0)
    d = Discriminator(channels=(8, 16, 16, 16), full_resolution_convs=3, full_resolution_channels=4, head="patch")
    x = torch.rand(1, 1, *size, requires_grad=True)
    y = torch.rand(1, 2, *size, requires_grad=True)
    out = d(x, y)
    assert out.shape == (1, 1)
    gx, gy = torch.autograd.grad(out.sum(), [x, y], create_graph=True)
    assert gx.shape == x.shape and gy.abs().sum() > 0
    # R1 takes a second derivative through the stem
    (gx.pow(2).sum() + gy.pow(2).sum()).backward()
    assert all(p.grad is not None for p in d.stem.parameters())


def test_negative_full_resolution_convs_is_rejected():
    with pytest.raises(ValueError, match="full_resolution_convs"):
        Discriminator(full_resolution_convs=-1)
