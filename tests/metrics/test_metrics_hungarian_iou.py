"""HM-IoU against the per-pair reference, edge cases, and input validation for the label-map metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_reference import MULTI_CLASSES, MULTI_IGNORE, make_maps, ref_hm_iou

from car_med.metrics import generalized_energy_distance, hungarian_matched_iou, matched_iou_from_matrix, pairwise_iou

CASES = [
    (n, spatial, multiclass) for n in (4, 16, 100) for spatial in ((6, 7), (3, 4, 5)) for multiclass in (False, True)
]


@pytest.mark.parametrize("n, spatial, multiclass", CASES)
def test_hm_iou_matches_per_pair_reference(n, spatial, multiclass):
    batch = 3 if n < 100 else 2
    samples, labels = make_maps(n + 31 * len(spatial) + multiclass, batch, n, 4, spatial, multiclass)
    classes = MULTI_CLASSES if multiclass else (1,)
    ignore = MULTI_IGNORE if multiclass else None
    got = hungarian_matched_iou(samples, labels, classes=classes, ignore_index=ignore)
    expected = [ref_hm_iou(samples[b].numpy(), labels[b].numpy(), classes, ignore) for b in range(batch)]
    assert got.shape == (batch,)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)


def test_all_empty_gives_hm_iou_one():
    samples = torch.zeros(2, 16, 5, 5, dtype=torch.long)
    labels = torch.zeros(2, 4, 5, 5, dtype=torch.long)
    assert torch.equal(hungarian_matched_iou(samples, labels), torch.ones(2, dtype=torch.float64))


def test_samples_equal_to_tiled_labels_give_hm_iou_one_and_a_permutation_too():
    _, labels = make_maps(4, 2, 4, 4, (8, 8), multiclass=False)
    samples = labels.repeat(1, 4, 1, 1)[:, torch.randperm(16)]
    torch.testing.assert_close(hungarian_matched_iou(samples, labels), torch.ones(2, dtype=torch.float64))


def test_matching_is_one_to_one():
    # two labels, both samples identical to label 0: a 1:1 matching must pair one sample with label 1
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1
    labels[0, 1, 2:] = 1
    samples = labels[:, :1].repeat(1, 2, 1, 1)
    assert float(hungarian_matched_iou(samples, labels)[0]) == pytest.approx(0.5)


def test_matched_iou_from_matrix_agrees_with_scipy_on_tiled_matrix():
    iou = torch.rand(3, 8, 4, dtype=torch.float64)
    got = matched_iou_from_matrix(iou)
    from scipy.optimize import linear_sum_assignment

    for b in range(3):
        full = np.tile(iou[b].numpy(), (1, 2))
        rows, cols = linear_sum_assignment(-full)
        assert float(got[b]) == pytest.approx(full[rows, cols].mean(), abs=1e-12)


def _message(excinfo) -> str:
    return str(excinfo.value)


def test_n_not_multiple_of_r_raises_naming_shapes():
    samples = torch.zeros(2, 6, 4, 4, dtype=torch.long)
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple") as err:
        hungarian_matched_iou(samples, labels)
    assert "(2, 6, 4, 4)" in _message(err) and "(2, 4, 4, 4)" in _message(err)


@pytest.mark.parametrize(
    "fn", [generalized_energy_distance, hungarian_matched_iou, lambda s, y, **kw: pairwise_iou(s, y, **kw)]
)
def test_bad_label_maps_raise_value_errors_naming_shapes(fn):
    s = torch.zeros(2, 4, 5, 6, dtype=torch.long)
    y = torch.zeros(2, 4, 5, 6, dtype=torch.long)

    with pytest.raises(ValueError, match="batch size mismatch") as err:
        fn(s, y[:1])
    assert "(2, 4, 5, 6)" in _message(err) and "(1, 4, 5, 6)" in _message(err)

    with pytest.raises(ValueError, match="spatial shape mismatch") as err:
        fn(s, y[..., :5])
    assert "(5, 6)" in _message(err) and "(5, 5)" in _message(err)

    with pytest.raises(ValueError, match="integer label maps") as err:
        fn(s, y.float())
    assert "(2, 4, 5, 6)" in _message(err) and "float32" in _message(err)

    with pytest.raises(ValueError, match="integer label maps"):
        fn(s.double(), y)

    with pytest.raises(ValueError, match="same number of dims") as err:
        fn(s, y[:, 0])
    assert "(2, 5, 6)" in _message(err)

    with pytest.raises(ValueError, match="class id out of range"):
        fn(s, y, classes=(-1,))
    with pytest.raises(ValueError, match="class id out of range") as err:
        fn(s, y, classes=(1, 30), num_classes=25)
    assert "30" in _message(err)
    y_bad = y.clone()
    y_bad[1, 2, 3, 4] = 40
    with pytest.raises(ValueError, match="class id out of range") as err:
        fn(s, y_bad, classes=(1,), num_classes=25)
    assert "(2, 4, 5, 6)" in _message(err) and "40" in _message(err)
    # the ignore value itself is allowed outside [0, num_classes)
    y_ign = y.clone()
    y_ign[0, 0, 0, 0] = 255
    fn(s, y_ign, classes=(1,), num_classes=25, ignore_index=255)

    with pytest.raises(ValueError, match="overlap"):
        fn(s, y, classes=(1, 24), ignore_index=24)
    with pytest.raises(ValueError, match="at least one spatial dim"):
        fn(s[:, :, 0, 0], y[:, :, 0, 0])


def test_bad_label_weights_raise():
    s, y = make_maps(1, 2, 4, 4, (4, 4), multiclass=False)
    with pytest.raises(ValueError, match=r"\(2, 4\)") as err:
        generalized_energy_distance(s, y, label_weights=torch.ones(3))
    assert "(3,)" in _message(err)
    with pytest.raises(ValueError, match="non-negative"):
        generalized_energy_distance(s, y, label_weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="positive sum"):
        generalized_energy_distance(s, y, label_weights=torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2 labels"):
        generalized_energy_distance(s, y[:, :1], unbiased=True)


def test_mixed_dtypes_and_classes_beyond_a_narrow_dtype():
    samples, labels = make_maps(2, 2, 8, 4, (5, 5), multiclass=False)
    labels = labels * 300  # class 300 exists only in the int64 labels; uint8 samples cannot hold it
    expected = generalized_energy_distance(samples.long(), labels, classes=(0, 300))
    torch.testing.assert_close(generalized_energy_distance(samples.to(torch.uint8), labels, classes=(0, 300)), expected)
    torch.testing.assert_close(
        hungarian_matched_iou(samples.to(torch.uint8), labels, classes=(0, 300)),
        hungarian_matched_iou(samples.long(), labels, classes=(0, 300)),
    )
