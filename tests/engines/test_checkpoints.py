"""Finding and loading checkpoints, with clear errors for another architecture (car_med.engines.checkpoints)."""

from __future__ import annotations

import pytest
import torch
from tiny_car import make_tiny_nets

from car_med.engines import (
    load_network_checkpoint,
)


def test_loading_a_checkpoint_of_the_wrong_network_says_what_was_expected(tmp_path):
    f, g, d = make_tiny_nets()
    path = tmp_path / "ckpt.pt"
    torch.save({"refinement_network": g.state_dict(), "discriminator": d.state_dict()}, path)
    with pytest.raises(ValueError, match="does not hold a Discriminator"):
        load_network_checkpoint(make_tiny_nets()[2], path, key="refinement_network")
    wider = make_tiny_nets()[1].__class__(
        image_channels=1, num_classes=2, noise_dim=g.noise_dim + 3, channels=(8, 16, 16, 16)
    )
    with pytest.raises(ValueError, match="wrong shape"):
        load_network_checkpoint(wider, path, key="refinement_network")
    with pytest.raises(ValueError, match="no entry 'generator'"):
        load_network_checkpoint(g, path, key="generator")
    with pytest.raises(FileNotFoundError):
        load_network_checkpoint(g, tmp_path / "missing.pt")
