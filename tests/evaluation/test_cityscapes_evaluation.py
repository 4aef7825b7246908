"""Cityscapes evaluation: the 32 analytic modes, GED with both absent-class conventions, per-class calibration of
F and G, F's ECE, and the packed-input networks the bundle builds on."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from car_med.evaluation.cityscapes import CityscapesMetricSuite, cityscapes_energy_distance, plot_class_calibration
from car_med.metrics import (
    CITYSCAPES_STOCHASTIC_CLASSES,
    CITYSCAPES_SWITCHABLE_CLASSES,
    stochastic_label_modes,
    stochastic_mode_weights,
)
from car_med.networks.conditioned import (
    LabelDistributionCalibration,
    PackedBlackBoxCalibrationNet,
    PackedInputDiscriminator,
    PackedInputRefinementUNet,
    analytic_label_distribution,
)


def street_label(h: int = 16, w: int = 32) -> torch.Tensor:
    """(1, h, w): sky/building on top, vegetation, a car and a person, sidewalk and road below, ignore corner."""
    label = torch.full((1, h, w), 2, dtype=torch.long)  # building
    label[:, : h // 4] = 10  # sky
    label[:, h // 4 : h // 2, : w // 4] = 8  # vegetation
    label[:, h // 2 : 3 * h // 4] = 1  # sidewalk
    label[:, 3 * h // 4 :] = 0  # road
    label[:, h // 2 : 3 * h // 4, w // 2 : w // 2 + 4] = 13  # car
    label[:, h // 2 - 3 : h // 2, w - 6 : w - 4] = 11  # person
    label[:, -2:, -4:] = 24  # ignore (ego vehicle)
    return label


def test_analytic_mode_weights_sum_to_one_and_match_the_flip_probabilities():
    weights = stochastic_mode_weights(CITYSCAPES_STOCHASTIC_CLASSES)
    assert weights.shape == (32,)
    assert abs(float(weights.sum()) - 1.0) < 1e-12
    modes = stochastic_label_modes(street_label())
    for _base, flipped, p in CITYSCAPES_STOCHASTIC_CLASSES:
        flipped_in_mode = (modes[0] == flipped).flatten(1).any(dim=1).double()
        assert abs(float((weights * flipped_in_mode).sum()) - p) < 1e-12


def test_ged_is_zero_when_the_samples_are_the_modes_in_their_proportions():
    label = street_label()
    halves = [(b, f, 0.5) for b, f, _ in CITYSCAPES_STOCHASTIC_CLASSES]  # uniform weights: the 32 modes exactly
    modes = stochastic_label_modes(label, halves)
    for convention in ("skip", "one"):
        terms = cityscapes_energy_distance(modes, modes, stochastic_mode_weights(halves), absent_class=convention)
        assert float(terms.ged.abs().max()) < 1e-12, convention
        assert float(terms.d_ss[0]) > 0.1  # the modes do differ


def test_ged_near_zero_for_samples_drawn_from_the_true_mode_distribution():
    label = street_label()
    modes = stochastic_label_modes(label)
    weights = stochastic_mode_weights()
    draws = torch.multinomial(weights.float(), 2000, replacement=True, generator=torch.Generator().manual_seed(0))
    samples = modes[:, draws]
    ged = cityscapes_energy_distance(samples, modes, weights).ged
    assert 0.0 <= float(ged[0]) < 0.01
    # a collapsed model (always the un-flipped mode) is far off
    assert float(cityscapes_energy_distance(modes[:, :1].repeat(1, 16, 1, 1), modes, weights).ged[0]) > 0.2


def test_absent_class_conventions_differ_as_documented():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.long)  # all road
    b = a.clone()
    b[..., 2:] = 1  # half sidewalk
    skip = cityscapes_energy_distance(a, b, torch.ones(1), absent_class="skip")
    one = cityscapes_energy_distance(a, b, torch.ones(1), absent_class="one")
    # skip: mean over road (IoU 1/2) and sidewalk (0); one: (1/2 + 0 + 8 * 1) / 10
    assert abs(1.0 - float(skip.d_sy[0]) - 0.25) < 1e-12
    assert abs(1.0 - float(one.d_sy[0]) - 0.85) < 1e-12
    assert len(CITYSCAPES_SWITCHABLE_CLASSES) == 10
    with pytest.raises(ValueError, match="absent_class"):
        cityscapes_energy_distance(a, b, torch.ones(1), absent_class="nan")


def test_label_distribution_is_the_weighted_mean_of_the_one_hot_modes():
    label = street_label()
    modes = stochastic_label_modes(label)
    weights = stochastic_mode_weights().float()
    mean = (F.one_hot(modes, 25).float() * weights[None, :, None, None, None]).sum(dim=1).movedim(-1, 1)
    dist = analytic_label_distribution(label, 25)
    assert torch.allclose(dist, mean, atol=1e-6)
    packed = torch.cat([torch.rand(1, 3, *label.shape[1:]), label[:, None].float()], dim=1)
    assert torch.allclose(torch.softmax(LabelDistributionCalibration()(packed), dim=1), dist, atol=1e-6)


def test_suite_offsets_and_ece_are_zero_for_exactly_calibrated_f_and_g():
    label = street_label()
    dist = analytic_label_distribution(label, 25)
    # 17 samples per pixel; for each pair flip the whole class in round(17 p) of them (p = n/17 exactly)
    modes = stochastic_label_modes(label)[0]
    samples = label.repeat(17, 1, 1)
    for base, flipped, p in CITYSCAPES_STOCHASTIC_CLASSES:
        n = round(17 * p)
        samples[:n][samples[:n] == base] = flipped
    suite = CityscapesMetricSuite(ged_counts=(17,), calibration_count=17)
    suite.update(samples[None], label[:, None], dist, blackbox=label.clamp_max(18))
    values = suite.aggregate()
    assert values["g_mean_offset"] < 1e-12 and values["f_mean_offset"] < 1e-6
    assert values["ece"] < 1e-6
    assert 0.0 <= values["ged17"] < 0.1 and modes.shape[0] == 32
    assert set(suite.names) <= set(values)


def test_noise_response_is_one_for_coherent_calibrated_flips():
    label = street_label()
    samples = label.repeat(17, 1, 1)
    for base, flipped, p in CITYSCAPES_STOCHASTIC_CLASSES:
        n = round(17 * p)
        samples[:n][samples[:n] == base] = flipped
    suite = CityscapesMetricSuite(ged_counts=(17,), calibration_count=17, ece_bins=None)
    one_hot = F.one_hot(samples, 25).permute(0, 3, 1, 2).float()
    suite.update(samples[None], label[:, None], sample_probs=one_hot[None])
    assert suite.aggregate()["g_noise_response"] == pytest.approx(1.0, abs=1e-9)
    table = {row["class"]: row for row in suite.calibration_table()}
    assert table["sidewalk"]["g_spread"] == pytest.approx(table["sidewalk"]["reference_spread"], abs=1e-9)


def test_a_collapsed_g_at_a_near_tie_keeps_argmax_diversity_but_has_no_noise_response():
    # cGAN+L_ce's failure (docs/cityscapes.md): G outputs nearly the same soft map for every noise vector, with
    # sidewalk near its tie with the flipped class; a little noise then flips the argmax pixel by pixel
    torch.manual_seed(0)
    label = street_label()
    soft = analytic_label_distribution(label, 25)
    sidewalk = label[0] == 1
    soft[0, 19][sidewalk], soft[0, 1][sidewalk] = 0.5, 0.5
    probs = soft.repeat(16, 1, 1, 1)
    probs[:, 19] += 0.01 * torch.randn(16, *label.shape[1:]) * sidewalk
    samples = probs.argmax(dim=1)
    suite = CityscapesMetricSuite(ece_bins=None)
    suite.update(samples[None], label[:, None], sample_probs=probs[None])
    values = suite.aggregate()
    assert values["diversity16"] > 0.05  # the argmax samples differ...
    assert values["g_noise_response"] < 0.02  # ...but G's output hardly moves with its noise
    without = CityscapesMetricSuite(ece_bins=None)
    without.update(samples[None], label[:, None])
    assert math.isnan(without.aggregate()["g_noise_response"])  # not measured is NaN, never 0
    before = without.aggregate()
    with pytest.raises(ValueError, match="at least 16 samples"):
        without.update(samples[None], label[:, None], sample_probs=probs[None, :8])
    assert without.per_case()["ged16"] == [before["ged16"]]  # the refused batch added nothing


def test_f_offsets_use_only_pixels_where_the_black_box_is_right():
    label = street_label()
    dist = analytic_label_distribution(label, 25)
    wrong = dist.clone()
    blackbox = label.clamp_max(18).clone()
    road = label == 0
    blackbox[road] = 2  # the black box misses the road...
    wrong[:, 23][road] = 0.9  # ...and F is wrong exactly there
    wrong[:, 0][road] = 0.1
    samples = label.repeat(1, 16, 1, 1)
    correct = CityscapesMetricSuite(ece_bins=None)
    correct.update(samples, label[:, None], wrong, blackbox=blackbox)
    everywhere = CityscapesMetricSuite(ece_bins=None, f_calibration_pixels="all")
    everywhere.update(samples, label[:, None], wrong, blackbox=blackbox)
    assert correct.f_calibration().pixel_count[4] == 0  # no correct road pixel left: NaN, not a wrong number
    assert everywhere.aggregate()["f_offset_road"] == pytest.approx(0.9 - 4 / 17)
    assert correct.aggregate()["f_offset_sidewalk"] < 1e-6


def test_class_calibration_chart_is_written(tmp_path):
    suite = CityscapesMetricSuite(ece_bins=None)
    label = street_label()
    suite.update(label.repeat(1, 16, 1, 1), label[:, None], analytic_label_distribution(label, 25))
    path = plot_class_calibration(suite.calibration_table(), tmp_path / "fig6.png")
    assert path.stat().st_size > 1000


def test_packed_networks_see_what_the_authors_give_them():
    torch.manual_seed(0)
    image, bb = torch.rand(2, 3, 16, 32), F.one_hot(torch.randint(0, 19, (2, 16, 32)), 19).movedim(-1, 1).float()
    packed = torch.cat([image, bb], dim=1)
    f = PackedBlackBoxCalibrationNet(channels=8, num_blocks=2).eval()
    padded = torch.cat([bb, torch.zeros(2, 6, 16, 32)], dim=1)
    assert torch.equal(f(packed), super(PackedBlackBoxCalibrationNet, f).forward(image, padded))
    with pytest.raises(ValueError, match="22 channels"):
        f(image)
    g = PackedInputRefinementUNet(extra_channels=19, image_channels=3, num_classes=25, noise_dim=4, channels=[8, 8])
    g.eval()
    cal, noise = torch.softmax(torch.randn(2, 25, 16, 32), 1), torch.randn(2, 4)
    assert torch.equal(g(packed, cal, noise), g(image, cal, noise))
    with pytest.raises(ValueError, match="memory_saving='none'"):
        g._check_inputs(packed, cal, noise)
    d = PackedInputDiscriminator(extra_channels=19, image_channels=3, num_classes=25, channels=[8, 8])
    assert torch.equal(d(packed, cal), d(image, cal))


def test_noise_scale_bias_sets_every_injection_scale_and_keeps_the_state_dict_keys():
    kwargs = {"extra_channels": 19, "image_channels": 3, "num_classes": 25, "noise_dim": 4, "channels": [8, 8]}
    default = PackedInputRefinementUNet(**kwargs)
    assert all(torch.equal(site.scale.bias, torch.zeros_like(site.scale.bias)) for site in default.inject.values())
    g = PackedInputRefinementUNet(noise_scale_bias=1.0, **kwargs)
    assert len(g.inject) == 2
    assert all(torch.equal(site.scale.bias, torch.ones_like(site.scale.bias)) for site in g.inject.values())
    assert g.state_dict().keys() == default.state_dict().keys()
    # with s = 1 + s'(eps), the mean output over eps follows the features; with s zero-mean it barely does
    g.eval()
    image, cal = torch.randn(1, 3, 16, 32), torch.softmax(torch.randn(1, 25, 16, 32), 1)
    noise = torch.zeros(1, 4)
    assert not torch.allclose(g(image, cal, noise), torch.full((1, 25, 16, 32), 1 / 25), atol=1e-3)
