"""Hypothesis calibration (car_med.metrics.hypotheses): readers assigned to hypotheses, the hypothesis ECE and the
readers' coverage, on crafted lesions whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from car_med.metrics import (
    ScoredHypotheses,
    hypothesis_reliability,
    match_readers,
    plot_hypothesis_reliability,
    score_hypotheses,
)


def _box(top: int, left: int, height: int, width: int, size: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


EMPTY = np.zeros((12, 12), dtype=bool)
BIG = _box(2, 2, 6, 6)  # 36 px
SMALL = _box(3, 3, 4, 4)  # 16 px inside BIG: IoU 16/36 = 0.444
SHIFTED = _box(2, 4, 6, 6)  # overlaps BIG on 6x4 = 24 px: IoU 24/48 = 0.5
FAR = _box(8, 8, 4, 4)  # disjoint from BIG


def _stack(*masks: np.ndarray) -> np.ndarray:
    return np.stack(masks)


def test_a_reader_goes_to_the_hypothesis_it_overlaps_most_among_those_above_min_iou():
    # reader SHIFTED: IoU 0.5 with BIG (above min_iou too) and 30/42 with `near`, one column closer to it
    near = _box(2, 3, 6, 6)
    assert (SHIFTED & near).sum() / (SHIFTED | near).sum() == pytest.approx(30 / 42)
    matches = match_readers(_stack(BIG, near), [0.8, 0.2], _stack(SHIFTED), min_iou=0.5)
    assert matches.tolist() == [1]  # the less probable hypothesis, because it overlaps more


def test_min_iou_is_inclusive_and_below_it_a_reader_is_unmatched():
    assert match_readers(_stack(BIG), [1.0], _stack(SHIFTED), min_iou=0.5).tolist() == [0]  # IoU exactly 0.5
    assert match_readers(_stack(BIG), [1.0], _stack(SHIFTED), min_iou=0.51).tolist() == [-1]
    assert match_readers(_stack(BIG), [1.0], _stack(SMALL), min_iou=0.5).tolist() == [-1]  # 0.444
    assert match_readers(_stack(BIG), [1.0], _stack(FAR), min_iou=0.01).tolist() == [-1]


def test_ties_go_to_the_more_probable_hypothesis_then_to_the_earlier():
    # two identical representatives: same IoU for every reader
    assert match_readers(_stack(BIG, BIG), [0.3, 0.7], _stack(BIG)).tolist() == [1]
    assert match_readers(_stack(BIG, BIG), [0.5, 0.5], _stack(BIG)).tolist() == [0]


def test_an_empty_reader_matches_the_no_lesion_hypothesis_and_nothing_else():
    matches = match_readers(_stack(BIG, EMPTY), [0.75, 0.25], _stack(EMPTY, BIG, EMPTY), min_iou=0.5)
    assert matches.tolist() == [1, 0, 1]
    # without a "no lesion" hypothesis an empty reader is unmatched: IoU 0 against any drawn outline
    assert match_readers(_stack(BIG), [1.0], _stack(EMPTY), min_iou=0.01).tolist() == [-1]


def test_3d_masks_and_torch_integer_maps_are_accepted():
    volume = torch.zeros(2, 3, 12, 12, dtype=torch.long)
    volume[0, 1] = torch.from_numpy(BIG).long()
    readers = volume[:1].clone()  # the reader drew hypothesis 0's outline
    assert match_readers(volume, torch.tensor([0.5, 0.5]), readers).tolist() == [0]


def test_bad_inputs_are_refused_with_the_shapes_named():
    with pytest.raises(ValueError, match="boolean or integer 0/1 masks"):
        match_readers(_stack(BIG).astype(np.float32), [1.0], _stack(BIG))
    with pytest.raises(ValueError, match="same spatial shape"):
        match_readers(_stack(BIG), [1.0], np.zeros((1, 5, 5), dtype=bool))
    with pytest.raises(ValueError, match="one value per representative"):
        match_readers(_stack(BIG, FAR), [1.0], _stack(BIG))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        match_readers(_stack(BIG), [1.5], _stack(BIG))
    with pytest.raises(ValueError, match="min_iou"):
        match_readers(_stack(BIG), [1.0], _stack(BIG), min_iou=0.0)
    with pytest.raises(ValueError, match="at least one scored lesion"):
        hypothesis_reliability([])


def _lesion(probabilities: list[float], matches: list[int]) -> ScoredHypotheses:
    return ScoredHypotheses(np.asarray(probabilities, dtype=np.float64), np.asarray(matches, dtype=np.int64))


def test_ece_bins_and_coverage_of_two_crafted_lesions():
    # lesion A: q = (0.75, 0.25) and 4 readers: 3 on H1, 1 on H2. Lesion B: q = (0.75, 0.1875, 0.0625):
    # 2 readers on H1, 1 on the q = 0.0625 hypothesis, 1 unmatched.
    a = _lesion([0.75, 0.25], [0, 0, 1, 0])
    b = _lesion([0.75, 0.1875, 0.0625], [0, 2, -1, 0])
    result = hypothesis_reliability([a, b], n_bins=10)
    # bins (right-closed): 0.0625 -> (0, .1], 0.1875 -> (.1, .2], 0.25 -> (.2, .3], 0.75 (x2) -> (.7, .8]
    assert result.count.tolist() == [1, 1, 1, 0, 0, 0, 0, 2, 0, 0]
    assert result.readers.tolist() == [4, 4, 4, 0, 0, 0, 0, 8, 0, 0]
    assert result.assigned.tolist() == [1, 0, 1, 0, 0, 0, 0, 5, 0, 0]
    np.testing.assert_allclose(result.probability[[0, 1, 2, 7]], [0.0625, 0.1875, 0.25, 0.75])
    np.testing.assert_allclose(result.observed[[0, 1, 2, 7]], [0.25, 0.0, 0.25, 5 / 8])
    assert np.isnan(result.observed[3]) and np.isnan(result.probability[3])
    # ECE: (1 |0.0625-0.25| + 1 |0.1875-0| + 1 |0.25-0.25| + 2 |0.75-0.625|) / 5 = (0.1875+0.1875+0+0.25)/5
    assert result.ece == pytest.approx(0.125)
    # coverage: readers on a hypothesis with q >= 0.1: A all 4, B the two on H1 -> 6 of 8
    assert result.coverage == pytest.approx(6 / 8) and result.uncovered == pytest.approx(2 / 8)
    assert result.unmatched == pytest.approx(1 / 8)
    assert result.hypotheses_per_lesion == pytest.approx(2.5)
    assert (result.num_lesions, result.num_readers) == (2, 8)
    record = result.to_dict()
    assert record["observed"][3] is None and record["count"] == result.count.tolist()


def test_a_hypothesis_on_a_bin_edge_goes_to_the_lower_bin():
    result = hypothesis_reliability([_lesion([0.5, 0.3, 0.2], [0, 1, 2, 0])], n_bins=10)
    assert result.count.tolist() == [0, 1, 1, 0, 1, 0, 0, 0, 0, 0]  # (.1,.2], (.2,.3], (.4,.5]


def test_calibrated_hypotheses_score_zero_ece_and_a_certain_miss_scores_one():
    calibrated = [_lesion([0.75, 0.25], [0, 0, 0, 1]) for _ in range(3)]
    assert hypothesis_reliability(calibrated).ece == pytest.approx(0.0)
    # one fixed mask (q = 1) that no reader draws: observed 0 against 1
    wrong = hypothesis_reliability([_lesion([1.0], [-1, -1, -1, -1])])
    assert wrong.ece == pytest.approx(1.0) and wrong.coverage == 0.0 and wrong.unmatched == 1.0


def test_the_coverage_threshold_is_inclusive():
    lesion = _lesion([0.9, 0.1], [0, 1])
    assert hypothesis_reliability([lesion], min_probability=0.1).coverage == pytest.approx(1.0)
    assert hypothesis_reliability([lesion], min_probability=0.11).coverage == pytest.approx(0.5)


def test_score_hypotheses_keeps_the_probabilities_beside_the_matches():
    scored = score_hypotheses(_stack(BIG, EMPTY), [0.75, 0.25], _stack(BIG, EMPTY, EMPTY, SHIFTED))
    assert scored.matches.tolist() == [0, 1, 1, 0]
    assert scored.assigned.tolist() == [2, 2] and scored.num_readers == 4
    result = hypothesis_reliability([scored])
    assert result.ece == pytest.approx((abs(0.75 - 0.5) + abs(0.25 - 0.5)) / 2)


def test_the_reliability_figure_is_written(tmp_path):
    curves = {
        "model": hypothesis_reliability([_lesion([0.75, 0.25], [0, 0, 1, -1])]),
        "majority vote": hypothesis_reliability([_lesion([1.0], [0, 0, -1, -1])]),
    }
    path = tmp_path / "hypotheses_reliability.png"
    plot_hypothesis_reliability(curves, path, title="crafted")
    assert path.stat().st_size > 0
