"""GED, sample diversity and the pairwise IoU kernel against the per-pair reference, plus edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_reference import MULTI_CLASSES, MULTI_IGNORE, make_maps, ref_ged_terms, ref_iou

from car_med.metrics import (
    CITYSCAPES_IGNORE_INDEX,
    CITYSCAPES_STOCHASTIC_CLASSES,
    CITYSCAPES_SWITCHABLE_CLASSES,
    energy_distance_from_iou,
    generalized_energy_distance,
    hungarian_matched_iou,
    matched_iou_from_matrix,
    pairwise_iou,
    sample_diversity,
    stochastic_label_modes,
    stochastic_mode_weights,
)


def reference(samples, labels, classes, ignore, weights, unbiased=False):
    out = []
    for b in range(samples.shape[0]):
        w = None if weights is None else weights[b].numpy()
        out.append(ref_ged_terms(samples[b].numpy(), labels[b].numpy(), classes, ignore, w, unbiased))
    return np.array(out)  # (B, 4): ged, d_sy, d_ss, d_yy


CASES = [
    (n, spatial, multiclass, weighted)
    for n in (4, 16, 100)
    for spatial in ((6, 7), (3, 4, 5))
    for multiclass in (False, True)
    for weighted in (False, True)
]


@pytest.mark.parametrize("n, spatial, multiclass, weighted", CASES)
def test_ged_matches_per_pair_reference(n, spatial, multiclass, weighted):
    batch = 2 if n < 100 else 1
    samples, labels = make_maps(n * 7 + len(spatial) + multiclass, batch, n, 4, spatial, multiclass)
    classes = MULTI_CLASSES if multiclass else (1,)
    ignore = MULTI_IGNORE if multiclass else None
    weights = torch.as_tensor(np.random.default_rng(n).random((batch, 4)) + 0.1) if weighted else None

    # a small memory bound forces pixel chunks (16 pixels each) through the accumulation path
    max_elements = (n + 4) * 16 if n < 100 else 2**24
    terms = generalized_energy_distance(
        samples,
        labels,
        classes=classes,
        ignore_index=ignore,
        label_weights=weights,
        return_terms=True,
        max_elements=max_elements,
    )
    expected = reference(samples, labels, classes, ignore, weights)
    got = torch.stack(list(terms), dim=1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    plain = generalized_energy_distance(samples, labels, classes=classes, ignore_index=ignore, label_weights=weights)
    np.testing.assert_allclose(plain.numpy(), expected[:, 0], atol=1e-6, rtol=0)


def test_pairwise_kernel_matches_reference_per_pair():
    samples, labels = make_maps(3, 2, 5, 3, (5, 6), multiclass=True)
    iou = pairwise_iou(samples, labels, classes=MULTI_CLASSES, ignore_index=MULTI_IGNORE)
    s, y = samples.numpy(), labels.numpy()
    for b in range(2):
        valid = [y[b, r] != MULTI_IGNORE for r in range(3)]
        for i in range(5):
            for r in range(3):
                assert iou.sy[b, i, r] == pytest.approx(ref_iou(s[b, i], y[b, r], MULTI_CLASSES, valid[r]), abs=1e-12)
            for j in range(5):
                expected = ref_iou(s[b, i], s[b, j], MULTI_CLASSES, np.logical_and.reduce(valid))
                assert iou.ss[b, i, j] == pytest.approx(expected, abs=1e-12)
        for r in range(3):
            for q in range(3):
                expected = ref_iou(y[b, r], y[b, q], MULTI_CLASSES, valid[r] & valid[q])
                assert iou.yy[b, r, q] == pytest.approx(expected, abs=1e-12)


def test_cityscapes_setting_32_weighted_modes_matches_reference():
    rng = np.random.default_rng(11)
    base = torch.as_tensor(rng.choice([0, 1, 8, 11, 13, 2, 5, 24, 255], size=(2, 6, 8)))
    modes = stochastic_label_modes(base)
    weights = stochastic_mode_weights()
    assert modes.shape == (2, 32, 6, 8)
    samples = modes[:, torch.as_tensor(rng.integers(0, 32, size=16))]
    samples = torch.where(torch.as_tensor(rng.random(samples.shape) < 0.1), 19, samples)
    got = generalized_energy_distance(
        samples,
        modes,
        classes=CITYSCAPES_SWITCHABLE_CLASSES,
        ignore_index=CITYSCAPES_IGNORE_INDEX,
        label_weights=weights,
        return_terms=True,
    )
    expected = reference(samples, modes, CITYSCAPES_SWITCHABLE_CLASSES, CITYSCAPES_IGNORE_INDEX, weights.expand(2, 32))
    np.testing.assert_allclose(torch.stack(list(got), dim=1).numpy(), expected, atol=1e-6, rtol=0)


def test_mode_weights_and_modes():
    weights = stochastic_mode_weights()
    probs = [p for _, _, p in CITYSCAPES_STOCHASTIC_CLASSES]
    assert weights.shape == (32,)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(weights[0]) == pytest.approx(np.prod([1 - p for p in probs]))
    # mode 1 flips only the last pair (road -> road2), mode 16 only the first (sidewalk -> sidewalk2)
    assert float(weights[1]) == pytest.approx(np.prod([1 - p for p in probs[:-1]]) * probs[-1])
    assert float(weights[16]) == pytest.approx(probs[0] * np.prod([1 - p for p in probs[1:]]))
    label = torch.tensor([[0, 1, 8, 11, 13, 7]])
    modes = stochastic_label_modes(label)
    assert modes[0, 0].tolist() == [0, 1, 8, 11, 13, 7]
    assert modes[0, 1].tolist() == [23, 1, 8, 11, 13, 7]
    assert modes[0, 16].tolist() == [0, 19, 8, 11, 13, 7]
    assert modes[0, 31].tolist() == [23, 19, 22, 20, 21, 7]
    # an already flipped label has the same modes
    assert torch.equal(stochastic_label_modes(modes[:, 31]), modes)


def test_all_empty_gives_zero_ged():
    samples = torch.zeros(3, 16, 8, 8, dtype=torch.long)
    labels = torch.zeros(3, 4, 8, 8, dtype=torch.long)
    terms = generalized_energy_distance(samples, labels, return_terms=True)
    for t in terms:
        assert torch.equal(t, torch.zeros(3, dtype=torch.float64))


def test_samples_identical_to_labels_give_zero_ged():
    _, labels = make_maps(5, 3, 4, 4, (9, 9), multiclass=False)
    assert generalized_energy_distance(labels.clone(), labels).abs().max() < 1e-12
    # with one ignore mask shared by all labels (as in Cityscapes) every term is taken over the same pixels
    _, labels = make_maps(6, 2, 4, 4, (7, 7), multiclass=True)
    labels = torch.where((labels == MULTI_IGNORE).any(dim=1, keepdim=True), MULTI_IGNORE, labels)
    ged = generalized_energy_distance(labels.clone(), labels, classes=MULTI_CLASSES, ignore_index=MULTI_IGNORE)
    assert ged.abs().max() < 1e-12


def test_one_empty_sample_against_nonempty_labels():
    labels = torch.zeros(1, 4, 6, 6, dtype=torch.long)
    labels[0, :, 1:4, 1:4] = 1
    labels[0, 1, 3, 3] = 0
    samples = labels.clone()
    samples[0, 0] = 0  # the first sample is empty, the others match the labels
    iou = pairwise_iou(samples, labels, classes=(1,))
    assert torch.equal(iou.sy[0, 0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(iou.ss[0, 0, 1:], torch.zeros(3, dtype=torch.float64))
    assert float(iou.ss[0, 0, 0]) == 1.0  # empty vs empty
    terms = generalized_energy_distance(samples, labels, return_terms=True)
    expected = ref_ged_terms(samples[0].numpy(), labels[0].numpy(), (1,))
    np.testing.assert_allclose(torch.stack(list(terms)).squeeze(1).numpy(), expected, atol=1e-12)
    # d(S, Y): the empty sample is at distance 1 from every label; the rest are the label-label distances
    d_yy = 1.0 - iou.yy[0]
    assert float(terms.d_sy[0]) == pytest.approx((4 * 1.0 + d_yy[1:].sum().item()) / 16)


@pytest.mark.parametrize("weighted", [False, True])
def test_unbiased_differs_from_biased_by_the_formula(weighted):
    samples, labels = make_maps(8, 3, 16, 4, (8, 8), multiclass=False)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) if weighted else None
    biased = generalized_energy_distance(samples, labels, label_weights=weights, return_terms=True)
    unbiased = generalized_energy_distance(samples, labels, label_weights=weights, unbiased=True, return_terms=True)
    n, r = 16, 4
    w = torch.full((r,), 1 / r, dtype=torch.float64) if weights is None else weights / weights.sum()
    # d(a, a) = 0, so dropping the diagonals only changes the normalisers: N^2 -> N(N-1), sum w w -> sum_{r!=r'} w w
    expected_ss = biased.d_ss * n / (n - 1)
    expected_yy = biased.d_yy / (1.0 - (w**2).sum())
    torch.testing.assert_close(unbiased.d_sy, biased.d_sy)
    torch.testing.assert_close(unbiased.d_ss, expected_ss)
    torch.testing.assert_close(unbiased.d_yy, expected_yy)
    torch.testing.assert_close(unbiased.ged - biased.ged, -(biased.d_ss / (n - 1)) - (expected_yy - biased.d_yy))
    ref = np.array(
        [ref_ged_terms(samples[b].numpy(), labels[b].numpy(), (1,), None, w.numpy(), True) for b in range(3)]
    )
    np.testing.assert_allclose(torch.stack(list(unbiased), dim=1).numpy(), ref, atol=1e-6)


def test_label_weights_shapes_and_normalisation():
    samples, labels = make_maps(9, 2, 4, 4, (5, 5), multiclass=False)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a = generalized_energy_distance(samples, labels, label_weights=w)
    b = generalized_energy_distance(samples, labels, label_weights=(w * 10).expand(2, 4))
    torch.testing.assert_close(a, b)
    uniform = generalized_energy_distance(samples, labels, label_weights=torch.ones(4))
    torch.testing.assert_close(uniform, generalized_energy_distance(samples, labels))


def test_sample_diversity_is_the_ged_ss_term():
    samples, labels = make_maps(10, 2, 16, 4, (6, 6), multiclass=True)
    kw = dict(classes=MULTI_CLASSES, ignore_index=MULTI_IGNORE)
    terms = generalized_energy_distance(samples, labels, return_terms=True, **kw)
    torch.testing.assert_close(sample_diversity(samples, labels, **kw), terms.d_ss)
    # without ignore, labels are not needed
    bin_s, _ = make_maps(12, 2, 16, 4, (6, 6), multiclass=False)
    ref = [ref_ged_terms(bin_s[b].numpy(), bin_s[b, :1].numpy(), (1,))[2] for b in range(2)]
    np.testing.assert_allclose(sample_diversity(bin_s).numpy(), ref, atol=1e-12)


def test_bool_and_uint8_inputs_and_3d_chunking_agree():
    samples, labels = make_maps(13, 2, 16, 4, (4, 5, 6), multiclass=False)
    expected = generalized_energy_distance(samples, labels)
    torch.testing.assert_close(generalized_energy_distance(samples.bool(), labels.to(torch.uint8)), expected)
    torch.testing.assert_close(generalized_energy_distance(samples, labels, max_elements=17), expected)


def test_one_kernel_call_gives_ged_and_hm_iou():
    samples, labels = make_maps(14, 3, 8, 4, (6, 6), multiclass=True)
    kw = dict(classes=MULTI_CLASSES, ignore_index=MULTI_IGNORE)
    iou = pairwise_iou(samples, labels, **kw)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    shared = energy_distance_from_iou(iou, label_weights=w, unbiased=True)
    direct = generalized_energy_distance(samples, labels, label_weights=w, unbiased=True, return_terms=True, **kw)
    for a, b in zip(shared, direct):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(matched_iou_from_matrix(iou.sy), hungarian_matched_iou(samples, labels, **kw))
    with pytest.raises(ValueError, match="'sy', 'ss' and 'yy'"):
        energy_distance_from_iou(pairwise_iou(samples, labels, blocks=("sy",), **kw))
