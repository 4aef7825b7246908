"""G's spread over its samples per stochastic class, and the noise response that tells a collapsed G apart."""

from __future__ import annotations

import math

import pytest
import torch

from car_med.metrics import (
    class_sample_spread_statistics,
    noise_response_from_sums,
    reference_spread,
)

SIDEWALK, SIDEWALK_FLIPPED = 1, 19


def two_region_label(h: int = 4, w: int = 6) -> torch.Tensor:
    """(1, h, w): sidewalk on the left half, road (0) on the right half, one ignore pixel."""
    label = torch.zeros((1, h, w), dtype=torch.long)
    label[:, :, : w // 2] = SIDEWALK
    label[0, 0, -1] = 24
    return label


def one_hot_samples(label: torch.Tensor, flips: list[bool], channels: int = 25) -> torch.Tensor:
    """(1, M, C, H, W) one-hot samples: sample m has sidewalk flipped to 19 when flips[m]."""
    maps = []
    for flip in flips:
        m = label[0].clone()
        if flip:
            m[m == SIDEWALK] = SIDEWALK_FLIPPED
        maps.append(torch.nn.functional.one_hot(m, channels).permute(2, 0, 1).float())
    return torch.stack(maps)[None]


def test_coherent_one_hot_flips_have_the_reference_spread():
    label = two_region_label()
    # 8 of 17 samples flip the whole sidewalk: the spread of a Bernoulli(8/17) indicator
    probs = one_hot_samples(label, [k < 8 for k in range(17)])
    sums = class_sample_spread_statistics(label, probs)
    spreads, response = noise_response_from_sums(sums.sum(dim=0))
    assert sums.shape == (1, 5, 2)
    assert sums[0, 0, 0] == 12  # 12 sidewalk pixels, the road pair counts the road half
    assert spreads[0].item() == pytest.approx(reference_spread(8 / 17), abs=1e-12)
    assert reference_spread(8 / 17) == pytest.approx(math.sqrt(8 * 9) / 17)
    # road is never flipped here: spread 0, so the mean ratio over the two classes seen is (1 + 0) / 2
    assert spreads[4].item() == 0.0
    assert torch.isnan(spreads[1:4]).all()  # person, car, vegetation absent
    assert response == pytest.approx(0.5, abs=1e-12)


def test_a_g_that_ignores_its_noise_has_zero_response_even_at_a_near_tie():
    label = two_region_label()
    # the same soft output in every sample, just above the tie: its argmax flips the sidewalk every time, a
    # little noise would make the argmax flip pixel by pixel, but G's output does not move: response 0
    soft = torch.zeros(1, 25, *label.shape[1:])
    soft[0, SIDEWALK_FLIPPED][label[0] == SIDEWALK] = 0.51
    soft[0, SIDEWALK][label[0] == SIDEWALK] = 0.49
    soft[0, 0][label[0] != SIDEWALK] = 1.0
    probs = soft[:, None].repeat(1, 16, 1, 1, 1)
    spreads, response = noise_response_from_sums(class_sample_spread_statistics(label, probs).sum(dim=0))
    assert spreads[0].item() == 0.0 and response == 0.0


def test_spread_is_pooled_over_pixels_and_images_by_pixel_count():
    small, large = two_region_label(2, 2), two_region_label(4, 6)
    flipping = class_sample_spread_statistics(small, one_hot_samples(small, [True, False]))
    constant = class_sample_spread_statistics(large, one_hot_samples(large, [False, False]))
    spreads, _ = noise_response_from_sums(torch.cat([flipping, constant]).sum(dim=0))
    # 2 sidewalk pixels at spread 0.5 and 12 at spread 0
    assert spreads[0].item() == pytest.approx(2 * 0.5 / 14)


def test_label_with_a_channel_axis_and_flipped_labels_count_the_same_pixels():
    label = two_region_label()
    probs = one_hot_samples(label, [True, False, True])
    flipped_label = label.clone()
    flipped_label[label == SIDEWALK] = SIDEWALK_FLIPPED
    plain = class_sample_spread_statistics(label, probs)
    assert torch.equal(class_sample_spread_statistics(label[:, None], probs), plain)
    assert torch.equal(class_sample_spread_statistics(flipped_label, probs), plain)


def test_bad_inputs_name_what_was_expected():
    label = two_region_label()
    probs = one_hot_samples(label, [True, False])
    with pytest.raises(ValueError, match=r"\(B, M, C, \*spatial\)"):
        class_sample_spread_statistics(label, probs[:, 0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        class_sample_spread_statistics(label, probs[:, :1])
    with pytest.raises(ValueError, match="C=19"):
        class_sample_spread_statistics(label, probs[:, :, :19])
    with pytest.raises(ValueError, match="does not match"):
        class_sample_spread_statistics(label[:, :2], probs)
    with pytest.raises(ValueError, match="integer class indices"):
        class_sample_spread_statistics(label.float(), probs)


def test_classes_with_probability_zero_or_one_stay_out_of_the_response():
    label = two_region_label()
    triples = ((SIDEWALK, SIDEWALK_FLIPPED, 0.5), (0, 23, 1.0))
    sums = class_sample_spread_statistics(label, one_hot_samples(label, [True, False]), triples)
    spreads, response = noise_response_from_sums(sums.sum(dim=0), triples)
    assert spreads.tolist() == [0.5, 0.0]
    assert response == pytest.approx(1.0)  # sidewalk only: 0.5 / sqrt(0.25)
