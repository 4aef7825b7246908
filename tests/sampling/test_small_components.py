"""The sampler's speckle removal: stray foreground components of a hard sample become background."""

from __future__ import annotations

import pytest
import torch

from car_med.components import remove_small_components, small_components
from car_med.metrics.presence import speckle_pixels
from car_med.networks import ToyCalibrationMLP, ToyRefinementMLP
from car_med.sampling import CARSampler


def _crafted() -> torch.Tensor:
    """One 12x12 map: a 3x3 blob (9 px), a diagonal pair (two 1-px components under 4-connectivity), a 4-px bar."""
    maps = torch.zeros(12, 12, dtype=torch.long)
    maps[1:4, 1:4] = 1
    maps[8, 8] = maps[9, 9] = 1
    maps[6, 2:6] = 1
    return maps


def test_small_components_are_four_connected_and_counted_by_size():
    small = small_components(_crafted(), min_size=5)
    assert small.dtype == torch.bool and small.shape == (12, 12)
    assert small.sum() == 6  # the two diagonal pixels and the 4-px bar; the 9-px blob stays
    assert not small[1:4, 1:4].any() and small[8, 8] and small[9, 9] and small[6, 2:6].all()
    assert small_components(_crafted(), min_size=4).sum() == 2  # the bar has 4 px: not under 4


def test_remove_small_components_keeps_large_ones_and_empties_a_stray_only_map():
    maps = torch.stack([_crafted(), torch.zeros(12, 12, dtype=torch.long)])
    maps[1, 5, 5] = 1  # a sample holding one stray pixel
    cleaned = remove_small_components(maps, min_size=5)
    blob = torch.zeros(12, 12, dtype=torch.long)
    blob[1:4, 1:4] = 1
    assert torch.equal(cleaned[0], blob)
    assert cleaned[1].sum() == 0
    assert maps[1, 5, 5] == 1  # the input is not changed


def test_speckle_measure_counts_the_same_components():
    speckle, total = speckle_pixels(_crafted()[None, None], min_size=5)
    assert speckle.tolist() == [6.0] and total.tolist() == [15.0]


def _stray_pixel_networks(num_classes: int = 2) -> tuple[torch.nn.Module, torch.nn.Module]:
    """F, and a G whose argmax is one 4x4 lesion of class 1 plus a stray pixel in every sample."""

    class F(torch.nn.Module):
        def forward(self, image):
            return torch.zeros(image.shape[0], num_classes, *image.shape[2:])

    class G(torch.nn.Module):
        noise_dim = 2

        def forward(self, image, calibration, noise):
            logits = torch.zeros(image.shape[0], num_classes, *image.shape[2:])
            logits[:, 1] = -1.0
            logits[:, 1, 2:6, 2:6] = 1.0
            logits[:, 1, 12, 12] = 1.0
            return torch.softmax(logits, dim=1)

    return F(), G()


def test_sampler_removes_stray_components_from_the_samples_only():
    f, g = _stray_pixel_networks()
    image = torch.zeros(2, 1, 16, 16)
    plain = CARSampler(f, g, num_samples=3)(image, generator=torch.Generator().manual_seed(0))
    cleaned = CARSampler(f, g, num_samples=3, min_component_size=5)(image, generator=torch.Generator().manual_seed(0))
    assert plain.samples[..., 12, 12].eq(1).all() and plain.samples.sum() == 2 * 3 * 17
    assert cleaned.samples[..., 12, 12].eq(0).all() and cleaned.samples.sum() == 2 * 3 * 16
    torch.testing.assert_close(cleaned.mean, plain.mean)  # Gbar and G's probabilities are G's own
    torch.testing.assert_close(cleaned.probs, plain.probs)


def test_sampler_rejects_component_removal_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="min_component_size must be an integer >= 0"):
        CARSampler(*_stray_pixel_networks(), min_component_size=-1)
    with pytest.raises(ValueError, match="output_type='categorical'"):
        CARSampler(ToyCalibrationMLP(), ToyRefinementMLP(), output_type="continuous", min_component_size=5)
    with pytest.raises(ValueError, match="two-class maps"):
        CARSampler(*_stray_pixel_networks(num_classes=3), min_component_size=5)(torch.zeros(1, 1, 16, 16))
