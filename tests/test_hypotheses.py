"""group_samples: a lesion's samples grouped into hypotheses with probabilities, on sample sets with known groups."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from car_med.hypotheses import Hypothesis, group_samples, hypotheses_json, wilson_interval


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _eleven_four_one() -> np.ndarray:
    """16 samples: 11 near-identical outlines of one lesion (shifted by a pixel), 4 of a second one, 1 empty."""
    first = [_square(32, 4 + dy, 4 + dx, 8) for dy, dx in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (1, 1)] * 2][:11]
    second = [_square(32, 18 + d, 18, 10) for d in (0, 1, 0, 1)]
    return np.stack([*first, *second, np.zeros((32, 32), dtype=bool)])


def test_eleven_four_and_one_empty_give_three_hypotheses_with_their_shares():
    hypotheses = group_samples(_eleven_four_one())
    assert [h.count for h in hypotheses] == [11, 4, 1]
    assert [h.probability for h in hypotheses] == [11 / 16, 4 / 16, 1 / 16]
    assert hypotheses[0].members == tuple(range(11)) and hypotheses[1].members == (11, 12, 13, 14)
    assert hypotheses[2].members == (15,) and hypotheses[2].empty and hypotheses[2].voxels == 0
    assert not hypotheses[0].empty and hypotheses[0].voxels == 64
    assert math.isclose(sum(h.probability for h in hypotheses), 1.0)


def test_empty_samples_form_one_no_lesion_hypothesis_apart_from_drawn_outlines():
    samples = np.stack([np.zeros((16, 16), bool)] * 3 + [_square(16, 2, 2, 6)] * 2)
    hypotheses = group_samples(samples, min_iou=0.01)
    assert [(h.empty, h.members) for h in hypotheses] == [(True, (0, 1, 2)), (False, (3, 4))]
    assert hypotheses[0].mean_iou == 1.0  # two empty masks have IoU 1


@pytest.mark.parametrize("min_iou", [0.3, 0.5, 0.7, 0.9])
def test_every_two_members_of_a_hypothesis_overlap_at_least_min_iou(min_iou):
    # a chain of squares, each shifted one pixel from the last: neighbours overlap well, the ends not at all.
    # Single linkage would put the whole chain in one group; complete linkage must not.
    samples = np.stack([_square(40, 10, 2 + shift, 10) for shift in range(20)])
    hypotheses = group_samples(samples, min_iou=min_iou)
    assert len(hypotheses) > 1
    for hypothesis in hypotheses:
        for i, j in itertools.combinations(hypothesis.members, 2):
            assert _iou(samples[i], samples[j]) >= min_iou
    assert sorted(i for h in hypotheses for i in h.members) == list(range(20))


def test_the_grouping_does_not_depend_on_the_order_of_the_samples():
    rng = np.random.default_rng(0)
    # ties in the linkage: the chain gives many equal distances, so the merge order matters unless fixed by content
    samples = np.stack(
        [_square(40, 10, 2 + shift, 10) for shift in range(12)]
        + [np.zeros((40, 40), bool)] * 2
        + [_square(40, 1, 1, 3)]
    )
    reference = group_samples(samples, min_iou=0.5)
    as_masks = [({samples[i].tobytes() for i in h.members}, samples[h.representative].tobytes()) for h in reference]
    for _ in range(20):
        order = rng.permutation(len(samples))
        permuted = group_samples(samples[order], min_iou=0.5)
        assert [h.probability for h in permuted] == [h.probability for h in reference]
        got = [
            ({samples[order][i].tobytes() for i in h.members}, samples[order][h.representative].tobytes())
            for h in permuted
        ]
        assert got == as_masks
        # the same samples, by their original index
        assert [sorted(order[list(h.members)]) for h in permuted] == [list(h.members) for h in reference]


def test_the_wilson_interval_matches_a_hand_computed_value():
    # 11 of 16 at 95%: z = 1.959964, centre = (11/16 + z^2/32) / (1 + z^2/16), half = z/(1 + z^2/16) *
    # sqrt(11/16 * 5/16 / 16 + z^2 / 1024) -> 0.44404 .. 0.85835 (by hand, see the formula)
    low, high = wilson_interval(11, 16, 0.95)
    assert low == pytest.approx(0.444044, abs=1e-6) and high == pytest.approx(0.858354, abs=1e-6)
    # 0 of 16: the interval starts at 0 and is not a point (a Wald interval would be [0, 0])
    assert group_samples(_eleven_four_one())[0].interval == (low, high)
    wider = group_samples(_eleven_four_one(), confidence=0.99)[0].interval
    assert wider[0] < low and wider[1] > high
    # 0 of 16: the interval starts at 0 and is not a point (a Wald interval would be [0, 0])
    none_low, none_high = wilson_interval(0, 16, 0.95)
    assert none_low == 0.0 and none_high == pytest.approx(0.194, abs=1e-3)


def test_the_representative_is_the_member_closest_to_the_others():
    # three squares at shifts 0, 1, 2: the middle one overlaps both others most
    samples = np.stack([_square(20, 5, 2 + shift, 8) for shift in (0, 2, 1)])
    (hypothesis,) = group_samples(samples, min_iou=0.5)
    assert hypothesis.representative == 2
    ious = [_iou(samples[0], samples[1]), _iou(samples[0], samples[2]), _iou(samples[1], samples[2])]
    assert hypothesis.mean_iou == pytest.approx(sum(ious) / 3)


def test_ties_in_probability_are_broken_by_size_so_the_order_is_fixed():
    big, small = _square(30, 2, 2, 12), _square(30, 20, 20, 4)
    hypotheses = group_samples(np.stack([big, big, small, small]))
    assert [h.voxels for h in hypotheses] == [16, 144]
    assert [h.voxels for h in group_samples(np.stack([small, big, small, big]))] == [16, 144]


def test_sizes_in_mm_follow_the_spacing_in_2d_and_3d():
    (crop,) = group_samples(np.stack([_square(10, 0, 0, 4)] * 2), spacing=(0.5, 0.8))
    assert crop.area_mm2 == pytest.approx(16 * 0.4) and crop.volume_mm3 is None
    volume = np.zeros((3, 5, 10, 10), dtype=bool)
    volume[:, 1:3, 2:5, 2:6] = True  # 2 x 3 x 4 voxels
    (nodule,) = group_samples(torch.from_numpy(volume), spacing=(2.5, 0.7, 0.7))
    assert nodule.voxels == 24 and nodule.volume_mm3 == pytest.approx(24 * 2.5 * 0.49) and nodule.area_mm2 is None
    assert group_samples(volume)[0].volume_mm3 is None


def test_a_tensor_and_an_array_give_the_same_hypotheses():
    samples = _eleven_four_one()
    assert group_samples(torch.from_numpy(samples)) == group_samples(samples)


def test_min_iou_of_one_separates_every_distinct_outline():
    samples = np.stack([_square(20, 2, 2 + shift, 8) for shift in (0, 0, 1)])
    assert [h.members for h in group_samples(samples, min_iou=1.0)] == [(0, 1), (2,)]


def test_the_json_ranks_from_one_and_labels_for_viewers():
    out = hypotheses_json(group_samples(_eleven_four_one()))
    assert [h["rank"] for h in out] == [1, 2, 3]
    assert out[0]["label"] == "H1 p=0.69 (0.44-0.86)"
    assert out[2]["label"].startswith("H3 no lesion p=0.06") and out[2]["no_lesion"]
    assert out[0]["members"] == list(range(11)) and out[0]["interval"] == list(wilson_interval(11, 16))


@pytest.mark.parametrize(
    ("samples", "error", "message"),
    [
        (np.zeros((4, 8, 8), dtype=np.uint8), TypeError, "boolean masks"),
        (torch.zeros(4, 8, 8), TypeError, "boolean masks"),
        ([[[True]]], TypeError, "numpy array or torch tensor"),
        (np.zeros((0, 8, 8), dtype=bool), ValueError, "at least one sample"),
        (np.zeros((8, 8), dtype=bool), ValueError, r"\(M, H, W\) for a crop or \(M, D, H, W\)"),
        (np.zeros((2, 2, 2, 2, 2), dtype=bool), ValueError, "for a nodule, got shape"),
    ],
)
def test_bad_samples_get_a_clear_error(samples, error, message):
    with pytest.raises(error, match=message):
        group_samples(samples)


def test_per_sample_masks_on_different_grids_are_refused_by_sample():
    masks = [np.zeros((8, 8), bool), np.zeros((8, 8), bool), np.zeros((8, 9), bool)]
    with pytest.raises(ValueError, match=r"spatial shape mismatch: sample 2 has shape \(8, 9\), sample 0 has \(8, 8\)"):
        group_samples(masks)
    with pytest.raises(ValueError, match="at least one sample"):
        group_samples([])
    same = [torch.from_numpy(m) for m in _eleven_four_one()]
    assert group_samples(same) == group_samples(_eleven_four_one())


def test_a_spacing_that_does_not_match_the_spatial_shape_is_refused():
    with pytest.raises(ValueError, match=r"one positive value per spatial axis of samples \(8, 8\)"):
        group_samples(np.zeros((2, 8, 8), dtype=bool), spacing=(1.0, 1.0, 2.5))
    with pytest.raises(ValueError, match="positive"):
        group_samples(np.zeros((2, 8, 8), dtype=bool), spacing=(1.0, 0.0))


@pytest.mark.parametrize(("option", "value"), [("min_iou", 0.0), ("min_iou", 1.2), ("confidence", 1.0)])
def test_out_of_range_options_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        group_samples(np.zeros((2, 8, 8), dtype=bool), **{option: value})


def test_the_result_type_is_a_frozen_record():
    hypothesis = group_samples(_eleven_four_one())[0]
    assert isinstance(hypothesis, Hypothesis)
    with pytest.raises(AttributeError):
        hypothesis.probability = 1.0
