"""A nodule's hypotheses against its readers (car_med.evaluation.hypotheses): the model's, the majority vote's and
the readers' leave-one-out, on crafted nodules whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from car_med.evaluation.hypotheses import (
    HYPOTHESIS_METRICS,
    NoduleHypotheses,
    hypothesis_metrics,
    leave_one_out_scores,
    majority_vote_hypothesis,
    sample_hypotheses,
)


def _volume(*boxes: tuple[int, int, int, int, int, int], shape=(3, 10, 10)) -> torch.Tensor:
    """A uint8 volume with foreground 1 in each (z0, z1, y0, y1, x0, x1) box."""
    v = torch.zeros(shape, dtype=torch.uint8)
    for z0, z1, y0, y1, x0, x1 in boxes:
        v[z0:z1, y0:y1, x0:x1] = 1
    return v


EMPTY = _volume()
NODULE = _volume((0, 3, 2, 6, 2, 6))  # 48 voxels
OTHER = _volume((0, 3, 6, 9, 6, 9))  # disjoint from NODULE


def test_the_majority_vote_is_one_certain_hypothesis_of_the_voxelwise_majority():
    half = _volume((0, 3, 2, 6, 2, 4))  # the left half of NODULE
    readers = torch.stack([NODULE, NODULE, half, EMPTY])
    [vote], probabilities = majority_vote_hypothesis(readers)
    assert probabilities == [1.0]
    # left half: 3 of 4 slots; right half: 2 of 4, still "at least half"
    assert torch.equal(vote, NODULE.bool())
    assert torch.equal(majority_vote_hypothesis(torch.stack([NODULE, EMPTY, EMPTY, half]))[0][0], half.bool())


def test_leave_one_out_groups_the_other_three_readers_and_scores_the_fourth():
    # three readers drew the nodule, one left it empty
    readers = torch.stack([NODULE, NODULE, NODULE, EMPTY])
    scored = leave_one_out_scores(readers, min_iou=0.5)
    assert len(scored) == 4 and all(s.num_readers == 1 for s in scored)
    # holding out a drawing reader: the others give the outline (2/3) and "no lesion" (1/3); it matches the outline
    for held_out in range(3):
        np.testing.assert_allclose(scored[held_out].probabilities, [2 / 3, 1 / 3])
        assert scored[held_out].matches.tolist() == [0]
    # holding out the empty slot: the other three agree on the outline, p = 1, and the empty slot matches nothing
    np.testing.assert_allclose(scored[3].probabilities, [1.0])
    assert scored[3].matches.tolist() == [-1]
    with pytest.raises(ValueError, match="at least 2 reader slots"):
        leave_one_out_scores(readers[:1])


def test_sample_hypotheses_groups_the_samples_by_outline():
    samples = torch.stack([NODULE, NODULE, OTHER, NODULE, EMPTY, NODULE])
    representatives, probabilities = sample_hypotheses(samples, min_iou=0.5)
    np.testing.assert_allclose(probabilities, [4 / 6, 1 / 6, 1 / 6])
    # most probable first; the two singletons: the smaller representative first (the empty one)
    assert torch.equal(representatives[0], NODULE.bool()) and not representatives[1].any()
    assert torch.equal(representatives[2], OTHER.bool())


def test_a_nodule_scored_by_hand_for_the_model_and_both_rows():
    hypotheses = NoduleHypotheses(min_iou=0.5)
    # the model: 3 of 4 samples draw the nodule, 1 draws nothing; the readers: 3 draw it, 1 leaves it empty
    row = hypotheses.add(torch.stack([NODULE, NODULE, EMPTY, NODULE]), torch.stack([NODULE, NODULE, NODULE, EMPTY]))
    assert row == {"hypotheses": 2.0, "readers_covered": 4.0}
    model, rows = hypotheses.reliability()
    assert set(rows) == {"majority_vote", "readers_leave_one_out"}
    # model: q = (0.75, 0.25), observed (3/4, 1/4): calibrated, every reader covered
    assert model.ece == pytest.approx(0.0) and model.coverage == 1.0 and model.hypotheses_per_lesion == 2
    # majority vote: the nodule, q = 1, drawn by 3 of 4 readers
    vote = rows["majority_vote"]
    assert vote.ece == pytest.approx(0.25) and vote.coverage == pytest.approx(0.75)
    assert vote.hypotheses_per_lesion == 1 and vote.num_readers == 4
    # leave-one-out: 3 trials with (2/3 matched, 1/3 not), 1 trial with (1 not matched):
    # ECE = (3 |2/3 - 1| + 3 |1/3 - 0| + 1 |1 - 0|) / 7 = 3/7
    loo = rows["readers_leave_one_out"]
    assert loo.ece == pytest.approx(3 / 7) and loo.coverage == pytest.approx(0.75)
    assert loo.hypotheses_per_lesion == pytest.approx(7 / 4) and loo.num_lesions == 4
    assert loo.count.tolist() == [0, 0, 0, 3, 0, 0, 3, 0, 0, 1]  # q = 1/3, 2/3 and 1: the shares of 3 readers
    metrics = hypothesis_metrics(loo)
    assert tuple(metrics) == HYPOTHESIS_METRICS
    assert metrics["hypothesis_uncovered"] == pytest.approx(0.25) and metrics["hypothesis_unmatched"] == 0.25


def test_a_reader_that_draws_a_rare_outline_is_matched_but_not_covered():
    hypotheses = NoduleHypotheses(min_iou=0.5, rows=())
    samples = torch.stack([NODULE] * 15 + [OTHER])  # OTHER holds 1/16 < 0.1
    row = hypotheses.add(samples, torch.stack([NODULE, OTHER, EMPTY, NODULE]))
    assert row == {"hypotheses": 2.0, "readers_covered": 2.0}
    model, rows = hypotheses.reliability()
    assert rows == {}
    assert model.coverage == pytest.approx(0.5) and model.unmatched == pytest.approx(0.25)


def test_unknown_rows_a_bad_min_iou_and_mismatched_volumes_are_refused():
    with pytest.raises(ValueError, match="unknown hypothesis reference rows"):
        NoduleHypotheses(rows=("readers_oracle",))
    with pytest.raises(ValueError, match="min_iou"):
        NoduleHypotheses(min_iou=1.5)
    with pytest.raises(ValueError, match="share their spatial shape"):
        NoduleHypotheses().add(torch.stack([NODULE]), torch.zeros(4, 2, 10, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="before any nodule"):
        NoduleHypotheses().reliability()
