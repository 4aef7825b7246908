"""Reference rows: what a model's GED, HM-IoU, presence gap and speckle mean next to fixed predictors.

A GED alone cannot say whether a model is good: it depends on how much the readers disagree on the split. So
every LIDC evaluation also scores, on the same cases, sample counts and seed:

- ``readers_oracle``: each of the N samples is one reader slot drawn at random (seeded per case; an empty
  slot counts). The best a sampler can do; its GED is not 0 only because N is finite.
- ``majority_vote``: one fixed mask for all N samples, foreground where at least half of the R reader slots
  mark the pixel. It knows the labels, so it is a strong bar: a stochastic model must beat it to be worth
  its samples.
- ``f_threshold``: F(x) > 0.5, one fixed mask: what the calibration net alone gives.
- ``f_bernoulli``: each pixel drawn independently from F(x): the naive stochastic baseline, calibrated per
  pixel but incoherent (speckled).

The nodules' hypotheses are scored against two rows of their own (:mod:`car_med.evaluation.hypotheses`): the
majority vote as one hypothesis of probability 1, and ``readers_leave_one_out``, each reader scored against the
hypotheses the other readers form.

The rows use the model's own :class:`~car_med.evaluation.sample_metrics.SampleMetricSuite` definitions. Their
randomness comes from a generator per case seeded ``case_seed(seed, case) + 2**40``, a stream apart from the
model's noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from car_med.evaluation.sample_metrics import SampleMetricSuite, case_seed

__all__ = [
    "REFERENCE_LABELS",
    "REFERENCE_ROWS",
    "ReferenceRows",
    "flatten_references",
    "reference_generator",
    "reference_samples",
]

REFERENCE_ROWS = ("readers_oracle", "majority_vote", "f_threshold", "f_bernoulli")
REFERENCE_LABELS = {
    "readers_oracle": "readers' oracle",
    "majority_vote": "majority vote",
    "f_threshold": "F > 0.5",
    "f_bernoulli": "F Bernoulli",
    # scored on the nodules' hypotheses only (car_med.evaluation.hypotheses), not on the crops
    "readers_leave_one_out": "readers' leave-one-out",
}
_REFERENCE_STREAM = 2**40


def flatten_references(references: dict[str, dict[str, float]], prefix: str = "ref_") -> dict[str, float]:
    """``{row: {metric: value}}`` as flat ``{"ref_<row>_<metric>": value}`` (MLflow metric names)."""
    return {f"{prefix}{row}_{name}": value for row, values in references.items() for name, value in values.items()}


def reference_generator(seed: int, case_index: int) -> torch.Generator:
    """The CPU generator of one case's reference-row draws (apart from the model's noise stream)."""
    return torch.Generator().manual_seed(case_seed(seed, case_index) + _REFERENCE_STREAM)


def reference_samples(
    row: str,
    labels: torch.Tensor,
    calibration: torch.Tensor | None,
    num_samples: int,
    cases: Sequence[int],
    seed: int,
) -> torch.Tensor:
    """N hard samples per case of one reference row.

    Args:
        row: one of :data:`REFERENCE_ROWS`.
        labels: reader masks ``(B, R, H, W)``, foreground 1.
        calibration: F's probabilities ``(B, 2, H, W)`` (needed by the ``f_*`` rows).
        num_samples: N.
        cases: each case's index in its split (its seed).
        seed: the evaluation seed.

    Returns:
        ``(B, N, H, W)`` int64 samples.
    """
    labels = torch.as_tensor(labels).long()
    b, r = labels.shape[:2]
    if len(cases) != b:
        raise ValueError(f"cases must give one index per case: {len(cases)} for a batch of {b}.")
    if row == "readers_oracle":
        picks = torch.stack([torch.randint(r, (num_samples,), generator=reference_generator(seed, c)) for c in cases])
        return labels[torch.arange(b)[:, None], picks]
    if row == "majority_vote":
        vote = (labels == 1).float().mean(dim=1) >= 0.5
        return vote.long()[:, None].expand(-1, num_samples, -1, -1).contiguous()
    if row not in REFERENCE_ROWS:
        raise ValueError(f"reference row must be one of {REFERENCE_ROWS}, got {row!r}.")
    if calibration is None:
        raise ValueError(f"reference row {row!r} needs F's probabilities (calibration).")
    foreground = torch.as_tensor(calibration)[:, 1].float().cpu()
    if row == "f_threshold":
        return (foreground > 0.5).long()[:, None].expand(-1, num_samples, -1, -1).contiguous()
    draws = torch.stack(
        [torch.rand((num_samples, *foreground.shape[1:]), generator=reference_generator(seed, c)) for c in cases]
    )
    return (draws < foreground[:, None]).long()


class ReferenceRows:
    """One metric suite per reference row, fed from the same batches as the model's suite.

    Args:
        suite: the model's suite; each row gets a suite with the same counts, presence and speckle settings and
            no ECE (the rows have no probabilities of their own).
        rows: the rows to score (default: all of :data:`REFERENCE_ROWS`).
    """

    def __init__(self, suite: SampleMetricSuite, rows: Sequence[str] = REFERENCE_ROWS) -> None:
        unknown = [row for row in rows if row not in REFERENCE_ROWS]
        if unknown:
            raise ValueError(f"unknown reference rows {unknown}; choose from {REFERENCE_ROWS}.")
        self.suites = {row: suite.like(ece_bins=None) for row in rows}
        self.num_samples = suite.max_samples

    def reset(self) -> None:
        for suite in self.suites.values():
            suite.reset()

    def update(self, labels: torch.Tensor, calibration: torch.Tensor | None, cases: Sequence[int], seed: int) -> None:
        """Draw each row's samples for a batch and add them to its suite."""
        for row, suite in self.suites.items():
            suite.update(reference_samples(row, labels, calibration, self.num_samples, cases, seed), labels)

    def aggregate(self) -> dict[str, dict[str, float]]:
        """``{row: {metric: mean}}``."""
        return {row: suite.aggregate() for row, suite in self.suites.items()}

    def per_case(self) -> dict[str, list[float]]:
        """Per-case values as ``{"<row>_<metric>": [...]}``, in the order the cases were added."""
        return {f"{row}_{k}": v for row, suite in self.suites.items() for k, v in suite.per_case().items()}
