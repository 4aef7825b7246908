"""RandStochasticClassFlipd: per-class flip frequencies, whole-class flips, and the 32 analytic modes."""

from __future__ import annotations

import numpy as np
import torch

from car_med.data.cityscapes import RandStochasticClassFlipd, StochasticLabelModesd, cityscapes_label_modes

# (base, flipped, probability), written out here from SPEC 3.2 rather than imported.
SPEC_FLIPS = [(1, 19, 8 / 17), (11, 20, 7 / 17), (13, 21, 6 / 17), (8, 22, 5 / 17), (0, 23, 4 / 17)]
DRAWS = 10_000


def _scene() -> torch.Tensor:
    """A (1, 6, 8) label holding the 5 base classes (several pixels each, not contiguous) and others."""
    rng = np.random.default_rng(0)
    values = np.array([0, 1, 8, 11, 13, 2, 10, 24] * 6)
    return torch.from_numpy(rng.permutation(values).reshape(1, 6, 8))


def test_flip_frequency_per_class_is_within_0_02_of_its_probability_and_flips_are_whole():
    label = _scene()
    flip = RandStochasticClassFlipd("label")
    flip.set_random_state(1234)
    flipped_counts = np.zeros(5)
    patterns = np.zeros(32)
    for _ in range(DRAWS):
        out = flip({"label": label})
        new = out["label"]
        for k, (base, twin, _) in enumerate(SPEC_FLIPS):
            was = label == base
            became = new[was]
            # a class flips as a whole: all of its pixels, or none
            assert bool((became == twin).all()) or bool((became == base).all())
            is_flipped = bool(became[0] == twin)
            assert is_flipped == bool(out["label_flips"][k])
            flipped_counts[k] += is_flipped
        others = ~torch.isin(label, torch.tensor([b for b, _, _ in SPEC_FLIPS]))
        assert torch.equal(new[others], label[others])
        patterns[int("".join("1" if f else "0" for f in out["label_flips"].tolist()), 2)] += 1
    frequencies = flipped_counts / DRAWS
    np.testing.assert_allclose(frequencies, [p for _, _, p in SPEC_FLIPS], atol=0.02)
    # the joint flip pattern follows the 32 analytic mode weights (mode m flips pair k iff bit K-1-k is set)
    _, weights = cityscapes_label_modes(label)
    np.testing.assert_allclose(patterns / DRAWS, weights.numpy(), atol=0.02)


def test_input_is_not_modified_and_absent_classes_change_nothing():
    label = torch.tensor([[[2, 10, 24, 3]]])
    flip = RandStochasticClassFlipd("label", flips_key=None).set_random_state(0)
    for _ in range(20):
        out = flip({"label": label})
        assert torch.equal(out["label"], label) and "label_flips" not in out
    scene = _scene()
    copy = scene.clone()
    flip({"label": scene})
    assert torch.equal(scene, copy)


def test_same_seed_same_flips():
    a = RandStochasticClassFlipd().set_random_state(7)
    b = RandStochasticClassFlipd().set_random_state(7)
    label = _scene()
    for _ in range(50):
        assert torch.equal(a({"label": label})["label"], b({"label": label})["label"])


def test_modes_and_weights_are_the_analytic_32():
    label = _scene()
    modes, weights = cityscapes_label_modes(label)
    assert modes.shape == (1, 32, 6, 8) and weights.shape == (32,)
    assert abs(float(weights.sum()) - 1.0) < 1e-12
    # mode 0 flips nothing, mode 31 everything; mode 0b10000 flips only sidewalk
    probs = np.array([p for _, _, p in SPEC_FLIPS])
    assert np.isclose(float(weights[0]), np.prod(1 - probs))
    assert np.isclose(float(weights[31]), np.prod(probs))
    assert np.isclose(float(weights[16]), probs[0] * np.prod(1 - probs[1:]))
    assert torch.equal(modes[0, 0], label[0])
    assert torch.equal(modes[0, 16][label[0] == 1], torch.full_like(modes[0, 16][label[0] == 1], 19))
    assert torch.equal(modes[0, 16][label[0] != 1], label[0][label[0] != 1])
    # an already flipped label gives the same modes
    flipped = RandStochasticClassFlipd().set_random_state(3)({"label": label})["label"]
    assert torch.equal(cityscapes_label_modes(flipped)[0], modes)
    item = StochasticLabelModesd("label")({"label": label})
    assert item["label_modes"].shape == (32, 6, 8) and torch.equal(item["label_mode_weights"], weights)
