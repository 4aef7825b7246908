"""Reference rows (car_med.evaluation.references): the oracle and majority-vote numbers against a literal
computation, written from their definitions with numpy loops and scipy, on a small crafted cohort."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from car_med.evaluation.references import REFERENCE_ROWS, ReferenceRows, reference_generator, reference_samples
from car_med.evaluation.sample_metrics import SampleMetricSuite


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _ged(samples: np.ndarray, labels: np.ndarray) -> float:
    d = lambda x, y: 1.0 - _iou(x, y)  # noqa: E731
    sy = np.mean([d(s, y) for s in samples for y in labels])
    ss = np.mean([d(s, t) for s in samples for t in samples])
    yy = np.mean([d(y, z) for y in labels for z in labels])
    return 2 * sy - ss - yy


def _hm_iou(samples: np.ndarray, labels: np.ndarray) -> float:
    tiled = np.concatenate([labels] * (len(samples) // len(labels)))
    cost = np.array([[1.0 - _iou(s, y) for y in tiled] for s in samples])
    rows, cols = linear_sum_assignment(cost)
    return float(np.mean(1.0 - cost[rows, cols]))


def _cohort(cases: int = 6, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Reader masks with real disagreement (discs of different radii, some slots empty) and an F map."""
    gen = torch.Generator().manual_seed(7)
    r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(cases, 4, size, size, dtype=torch.long)
    for b in range(cases):
        for k in range(4):
            if torch.rand((), generator=gen) < 0.3:
                continue  # this reader left the slice empty
            radius = 2 + 5 * torch.rand((), generator=gen)
            labels[b, k] = (((r - 12) ** 2 + (c - 11) ** 2) <= radius**2).long()
    share = labels.float().mean(1)
    calibration = torch.stack([1 - share, share], 1).clamp(0.02, 0.98)
    return labels, calibration


def test_oracle_and_majority_vote_match_a_literal_computation():
    labels, calibration = _cohort()
    n, seed, cases = 8, 3, list(range(10, 16))
    suite = SampleMetricSuite(ged_counts=(n,), hm_iou_counts=(n,), diversity_count=n, ece_bins=None)
    rows = ReferenceRows(suite)
    rows.update(labels, calibration, cases, seed)
    got = rows.aggregate()

    y = labels.numpy().astype(bool)
    oracle, majority = [], []
    for b, case in enumerate(cases):
        picks = torch.randint(4, (n,), generator=reference_generator(seed, case)).numpy()
        oracle.append(y[b][picks])
        vote = y[b].sum(0) * 2 >= 4  # at least half of the 4 slots
        majority.append(np.stack([vote] * n))
    for name, draws in (("readers_oracle", oracle), ("majority_vote", majority)):
        expected_ged = np.mean([_ged(s, y[b]) for b, s in enumerate(draws)])
        expected_hm = np.mean([_hm_iou(s, y[b]) for b, s in enumerate(draws)])
        assert got[name][f"ged{n}"] == pytest.approx(expected_ged, abs=1e-9)
        assert got[name][f"hm_iou{n}"] == pytest.approx(expected_hm, abs=1e-9)
    # the fixed mask has no diversity; the oracle's samples are real reader masks, so no speckle
    assert got["majority_vote"][f"diversity{n}"] == 0.0
    assert got["readers_oracle"]["speckle"] == 0.0
    # the oracle is far better than the fixed mask on this cohort, as on LIDC
    assert got["readers_oracle"][f"ged{n}"] < 0.5 * got["majority_vote"][f"ged{n}"]


def test_reference_draws_depend_only_on_seed_and_case():
    labels, calibration = _cohort()
    for row in ("readers_oracle", "f_bernoulli"):
        together = reference_samples(row, labels, calibration, 8, [0, 1, 2, 3, 4, 5], seed=0)
        alone = reference_samples(row, labels[3:4], calibration[3:4], 8, [3], seed=0)
        assert torch.equal(together[3], alone[0])
        other = reference_samples(row, labels[3:4], calibration[3:4], 8, [3], seed=1)
        assert not torch.equal(other[0], alone[0])


def test_f_rows_follow_f():
    labels, calibration = _cohort()
    fixed = reference_samples("f_threshold", labels, calibration, 4, list(range(6)), seed=0)
    assert torch.equal(fixed[:, 0], (calibration[:, 1] > 0.5).long()) and torch.equal(fixed[:, 0], fixed[:, 3])
    # Bernoulli draws hit F's probability on average
    bernoulli = reference_samples("f_bernoulli", labels, calibration, 400, list(range(6)), seed=0)
    assert (bernoulli.float().mean(1) - calibration[:, 1]).abs().max() < 0.1


def test_bad_rows_and_missing_f_are_refused():
    labels, calibration = _cohort()
    suite = SampleMetricSuite(ged_counts=(4,), hm_iou_counts=(4,), diversity_count=4, ece_bins=None)
    with pytest.raises(ValueError, match="unknown reference rows"):
        ReferenceRows(suite, ["median"])
    with pytest.raises(ValueError, match="needs F's probabilities"):
        reference_samples("f_bernoulli", labels, None, 4, list(range(6)), seed=0)
    with pytest.raises(ValueError, match="one index per case"):
        reference_samples("readers_oracle", labels, calibration, 4, [0], seed=0)
    assert set(ReferenceRows(suite).suites) == set(REFERENCE_ROWS)
