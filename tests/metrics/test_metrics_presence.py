"""Presence calibration and speckle of hard samples (car_med.metrics.presence) on crafted maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from car_med.metrics.presence import (
    PresenceGap,
    SpeckleFraction,
    empty_share,
    plot_presence_reliability,
    presence_gap,
    presence_reliability,
    speckle_pixels,
)


def _disc(size: int = 16, radius: float = 4.0, centre=(8, 8)) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((r - centre[0]) ** 2 + (c - centre[1]) ** 2) <= radius**2).long()


def test_a_map_with_only_stray_pixels_counts_as_empty_and_a_drawn_nodule_does_not():
    stray = torch.zeros(16, 16, dtype=torch.long)
    stray[0, 0] = stray[5, 9] = stray[12, 3] = 1  # 3 pixels < 5
    maps = torch.stack([torch.zeros(16, 16, dtype=torch.long), stray, _disc()])[None]
    assert empty_share(maps).tolist() == pytest.approx([2 / 3])
    assert empty_share(maps, min_area=1).tolist() == pytest.approx([1 / 3])


def test_presence_gap_compares_empty_sample_share_with_empty_reader_share():
    readers = torch.stack([_disc(), _disc(), torch.zeros(16, 16, dtype=torch.long), torch.zeros(16, 16).long()])
    # 16 samples, 4 of them empty: 0.25 against the readers' 0.5
    samples = torch.stack([_disc()] * 12 + [torch.zeros(16, 16, dtype=torch.long)] * 4)
    gap = presence_gap(samples[None], readers[None])
    assert gap.tolist() == pytest.approx([0.25])
    metric = PresenceGap()
    metric(y_pred=samples[None], y=readers[None])
    metric(y_pred=torch.stack([torch.zeros(16, 16, dtype=torch.long)] * 16)[None], y=readers[None])
    assert metric.aggregate().item() == pytest.approx((0.25 + 0.5) / 2)
    assert metric.aggregate("none").tolist() == pytest.approx([0.25, 0.5])


def test_speckle_counts_pixels_in_small_four_connected_components():
    sample = _disc(32, 6.0, (12, 12)).clone()
    disc_pixels = int(sample.sum())
    sample[30, 30] = 1  # an isolated pixel
    sample[28, 2] = sample[29, 3] = 1  # diagonal neighbours: two 4-connected components of 1
    sample[0, 20:24] = 1  # a line of 4 pixels: one component under 5
    sample[5, 26:31] = 1  # 5 pixels: not speckle
    speckle, total = speckle_pixels(sample[None, None])
    assert speckle.tolist() == [7.0]
    assert total.tolist() == [float(disc_pixels + 1 + 2 + 4 + 5)]
    metric = SpeckleFraction()
    metric(y_pred=sample[None, None])
    metric(y_pred=torch.zeros(1, 2, 32, 32, dtype=torch.long))  # no foreground: adds nothing to the pool
    assert metric.aggregate().item() == pytest.approx(7 / (disc_pixels + 12))
    per_image = metric.aggregate("none")
    assert per_image[0].item() == pytest.approx(7 / (disc_pixels + 12)) and torch.isnan(per_image[1])


def test_reader_masks_have_no_speckle_and_pixelwise_noise_is_mostly_speckle():
    readers = torch.stack([_disc(32, r, (16, 16)) for r in (3.0, 5.0, 7.0, 9.0)])[None]
    assert speckle_pixels(readers)[0].item() == 0
    noise = (torch.rand(1, 8, 64, 64, generator=torch.Generator().manual_seed(0)) < 0.1).long()
    speckle, total = speckle_pixels(noise)
    assert speckle.item() / total.item() > 0.9


def test_presence_reliability_bins_crops_by_sample_empty_share(tmp_path):
    curve = presence_reliability([0.0, 0.05, 0.5, 1.0], [0.0, 0.25, 0.75, 1.0], n_bins=2)
    assert curve.count.tolist() == [2, 2]
    assert curve.sample_empty.tolist() == pytest.approx([0.025, 0.75])
    assert curve.reader_empty.tolist() == pytest.approx([0.125, 0.875])
    assert curve.gap == pytest.approx(np.mean([0.0, 0.2, 0.25, 0.0]))
    out = plot_presence_reliability({"model": curve}, tmp_path / "presence.png")
    assert out.stat().st_size > 1000


def test_bad_inputs_name_what_was_expected():
    with pytest.raises(ValueError, match=r"\(B, N, H, W\)"):
        empty_share(torch.zeros(4, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer label maps"):
        speckle_pixels(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="share batch and spatial size"):
        presence_gap(torch.zeros(1, 4, 8, 8, dtype=torch.long), torch.zeros(1, 4, 9, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="min_area"):
        empty_share(torch.zeros(1, 2, 8, 8, dtype=torch.long), min_area=0)


def test_a_diagonal_staircase_is_speckle_under_four_connectivity():
    stairs = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    for i in range(6):
        stairs[0, 0, 4 + i, 4 + i] = 1  # 6 pixels touching only at corners: 6 components of 1
    speckle, total = speckle_pixels(stairs)
    assert speckle.tolist() == [6.0] and total.tolist() == [6.0]


def test_samples_and_readers_follow_the_same_empty_rule():
    tiny = torch.zeros(16, 16, dtype=torch.long)
    tiny[3, 3:6] = 1  # a reader's own 3-pixel mark: empty under the 5-pixel rule
    readers = torch.stack([_disc(), _disc(), tiny, torch.zeros(16, 16, dtype=torch.long)])[None]
    assert presence_gap(readers, readers).tolist() == [0.0]  # readers scored as samples: no gap
    metric = PresenceGap()
    metric(y_pred=readers, y=readers)
    assert metric.aggregate().item() == 0.0
    assert empty_share(readers).tolist() == [0.5]
