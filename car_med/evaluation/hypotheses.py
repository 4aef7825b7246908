"""A nodule's hypotheses against its readers: the model's probabilities checked, beside two reference rows.

Per nodule, on the volumes :class:`~car_med.evaluation.volumes.NoduleVolumes` stacks (the M sample volumes of
one shared noise draw and the R reader-slot volumes, an empty slot counting as a reader's "no lesion"):

- **the model**: its M sample volumes grouped into hypotheses by :func:`car_med.hypotheses.group_samples` at
  ``min_iou``, each with its share of the samples; all R readers are scored against them;
- ``majority_vote``: one hypothesis, p = 1, the voxelwise majority of the R reader slots (foreground where at
  least half of them mark the voxel; the 2D row's mask, stacked); all R readers are scored against it;
- ``readers_leave_one_out``: for each reader slot r, the other R - 1 slots grouped by ``group_samples`` at the
  same ``min_iou`` (each hypothesis with its share of the R - 1), and reader r alone scored against them; the
  R held-out readers of every nodule are pooled. It shows what the readers' own disagreement allows: a model
  whose hypotheses are as well calibrated as the readers' own shares scores as this row does.

Each reader is assigned to the hypothesis it matches (:func:`car_med.metrics.match_readers`), and the hypotheses
of all nodules are binned by probability (:func:`car_med.metrics.hypothesis_reliability`): the hypothesis ECE,
the readers' coverage (matched to a hypothesis with p >= 0.1) and its complement, the uncovered share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from car_med.hypotheses import DEFAULT_MIN_IOU, group_samples
from car_med.metrics.hypotheses import (
    DEFAULT_COVERAGE_PROBABILITY,
    DEFAULT_HYPOTHESIS_BINS,
    HypothesisReliability,
    ScoredHypotheses,
    hypothesis_reliability,
    plot_hypothesis_reliability,
    score_hypotheses,
)

__all__ = [
    "HYPOTHESIS_METRICS",
    "HYPOTHESIS_REFERENCE_ROWS",
    "NoduleHypotheses",
    "hypothesis_metrics",
    "leave_one_out_scores",
    "majority_vote_hypothesis",
    "sample_hypotheses",
]

HYPOTHESIS_REFERENCE_ROWS = ("majority_vote", "readers_leave_one_out")
"""The reference rows scored as hypotheses: one majority-vote mask (p = 1), and the readers' leave-one-out."""

HYPOTHESIS_METRICS = (
    "hypothesis_ece",
    "hypothesis_coverage",
    "hypothesis_uncovered",
    "hypothesis_unmatched",
    "hypotheses_per_nodule",
)
"""The keys :func:`hypothesis_metrics` gives, in ``metrics`` and in each reference row of ``metrics.json``."""


def hypothesis_metrics(reliability: HypothesisReliability) -> dict[str, float]:
    """The numbers of ``metrics.json`` from a :class:`~car_med.metrics.HypothesisReliability`: ECE, coverage,
    uncovered and unmatched shares of the reader masks, and the mean number of hypotheses per scored nodule (per
    nodule and held-out reader for the leave-one-out row)."""
    return {
        "hypothesis_ece": reliability.ece,
        "hypothesis_coverage": reliability.coverage,
        "hypothesis_uncovered": reliability.uncovered,
        "hypothesis_unmatched": reliability.unmatched,
        "hypotheses_per_nodule": reliability.hypotheses_per_lesion,
    }


def _foreground(maps: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    maps = torch.as_tensor(maps)
    if maps.is_floating_point():
        raise ValueError(f"{name} must be hard label maps (argmax samples or reader masks), got {maps.dtype}.")
    if maps.ndim < 3:
        raise ValueError(f"{name} must be maps (K, *spatial) with 2 or 3 spatial axes, got {tuple(maps.shape)}.")
    return maps.detach().cpu() == 1


def sample_hypotheses(samples: torch.Tensor, *, min_iou: float = DEFAULT_MIN_IOU) -> tuple[torch.Tensor, list[float]]:
    """A lesion's samples ``(M, *spatial)`` (foreground 1) as hypotheses: their representatives ``(K, *spatial)``
    (bool) and probabilities, most probable first (:func:`car_med.hypotheses.group_samples`)."""
    masks = _foreground(samples, "samples")
    hypotheses = group_samples(masks, min_iou=min_iou)
    representatives = torch.stack([masks[h.representative] for h in hypotheses])
    return representatives, [h.probability for h in hypotheses]


def majority_vote_hypothesis(labels: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The majority vote of the reader slots ``(R, *spatial)`` as one hypothesis of probability 1: foreground
    where at least half of the R slots mark the voxel (the 2D reference row's rule)."""
    readers = _foreground(labels, "labels")
    return (readers.float().mean(dim=0) >= 0.5)[None], [1.0]


def leave_one_out_scores(labels: torch.Tensor, *, min_iou: float = DEFAULT_MIN_IOU) -> list[ScoredHypotheses]:
    """Each reader slot scored against the hypotheses the other R - 1 slots form (``group_samples``, each
    hypothesis with its share of the R - 1): one :class:`~car_med.metrics.ScoredHypotheses` per held-out slot.

    Raises:
        ValueError: with fewer than 2 reader slots (nothing is left to form hypotheses).
    """
    readers = _foreground(labels, "labels")
    if readers.shape[0] < 2:
        raise ValueError(f"the readers' leave-one-out needs at least 2 reader slots, got {readers.shape[0]}.")
    scored = []
    for held_out in range(readers.shape[0]):
        others = torch.cat([readers[:held_out], readers[held_out + 1 :]])
        representatives, probabilities = sample_hypotheses(others, min_iou=min_iou)
        scored.append(
            score_hypotheses(representatives, probabilities, readers[held_out : held_out + 1], min_iou=min_iou)
        )
    return scored


class NoduleHypotheses:
    """Scores the model's hypotheses and the reference rows' nodule by nodule, then bins them all.

    Args:
        min_iou: the IoU of the grouping (every two members of a hypothesis) and of the assignment (a reader and
            a hypothesis's representative).
        rows: the reference rows to score, from :data:`HYPOTHESIS_REFERENCE_ROWS`.
        n_bins: equal-width probability bins of the ECE.
        min_probability: a reader is covered when it matches a hypothesis at least this probable.
    """

    def __init__(
        self,
        *,
        min_iou: float = DEFAULT_MIN_IOU,
        rows: Sequence[str] = HYPOTHESIS_REFERENCE_ROWS,
        n_bins: int = DEFAULT_HYPOTHESIS_BINS,
        min_probability: float = DEFAULT_COVERAGE_PROBABILITY,
    ) -> None:
        unknown = [row for row in rows if row not in HYPOTHESIS_REFERENCE_ROWS]
        if unknown:
            raise ValueError(f"unknown hypothesis reference rows {unknown}; choose from {HYPOTHESIS_REFERENCE_ROWS}.")
        if not 0 < min_iou <= 1:
            raise ValueError(f"min_iou must lie in (0, 1], got {min_iou}.")
        self.min_iou = float(min_iou)
        self.rows = tuple(rows)
        self.n_bins = int(n_bins)
        self.min_probability = float(min_probability)
        self._model: list[ScoredHypotheses] = []
        self._rows: dict[str, list[ScoredHypotheses]] = {row: [] for row in self.rows}
        self._per_nodule: list[dict[str, Any]] = []

    def add(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One nodule: its M sample volumes ``(M, *spatial)`` and R reader-slot volumes ``(R, *spatial)``
        (foreground 1).

        Returns:
            The nodule's row: ``hypotheses`` (the model's K) and ``readers_covered`` (of the R slots, those
            matched to a model hypothesis with p >= ``min_probability``).
        """
        if tuple(samples.shape[1:]) != tuple(labels.shape[1:]):
            raise ValueError(
                f"samples {tuple(samples.shape)} and labels {tuple(labels.shape)} must share their spatial shape."
            )
        readers = _foreground(labels, "labels")
        representatives, probabilities = sample_hypotheses(samples, min_iou=self.min_iou)
        model = score_hypotheses(representatives, probabilities, readers, min_iou=self.min_iou)
        self._model.append(model)
        if "majority_vote" in self._rows:
            vote, certain = majority_vote_hypothesis(labels)
            self._rows["majority_vote"].append(score_hypotheses(vote, certain, readers, min_iou=self.min_iou))
        if "readers_leave_one_out" in self._rows:
            self._rows["readers_leave_one_out"].extend(leave_one_out_scores(labels, min_iou=self.min_iou))
        matched = model.matches[model.matches >= 0]
        row = {
            "hypotheses": float(len(probabilities)),
            "readers_covered": float((model.probabilities[matched] >= self.min_probability).sum()),
        }
        self._per_nodule.append(row)
        return row

    def add_nodules(self, per_nodule: list[dict[str, Any]], stacks: Iterable[tuple]) -> None:
        """Score every nodule of an evaluation and add its row (:meth:`add`) to its ``per_nodule`` record.

        Args:
            per_nodule: the evaluation's nodule records (``patient_id``, ``series_uid``, ``nodule_id``, ...), updated
                in place.
            stacks: per nodule, in the same order, ``(key, _, samples, labels)`` as
                :meth:`~car_med.evaluation.volumes.NoduleVolumes.stacks` gives them.

        Raises:
            RuntimeError: when the two disagree on the order of the nodules.
        """
        for row, (key, _, samples, labels) in zip(per_nodule, stacks):
            if (row["patient_id"], row["series_uid"], row["nodule_id"]) != key:
                raise RuntimeError(f"nodule {key}: per_nodule and stacks() disagree on the order of the nodules.")
            row.update(self.add(samples, labels))

    def report(
        self, model_label: str, row_labels: Mapping[str, str], figure: Path, title: str
    ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, HypothesisReliability]]:
        """The numbers of ``metrics.json`` and the reliability diagram, once every nodule was added.

        Args:
            model_label: the model's name in the figure and in the curves.
            row_labels: each reference row's display name.
            figure: where ``hypotheses_reliability.png`` goes.
            title: the figure's title.

        Returns:
            ``(model_metrics, row_metrics, curves)``: the model's :func:`hypothesis_metrics`, each reference row's,
            and the binned curves by display name (model first).
        """
        model, rows = self.reliability()
        curves = {model_label: model, **{row_labels[row]: curve for row, curve in rows.items()}}
        plot_hypothesis_reliability(
            curves, figure, title=f"{title} ({model.num_lesions} nodules, min IoU {self.min_iou:g})"
        )
        return hypothesis_metrics(model), {row: hypothesis_metrics(curve) for row, curve in rows.items()}, curves

    def per_nodule(self) -> list[dict[str, float]]:
        """The rows :meth:`add` returned, in the order the nodules were added."""
        return list(self._per_nodule)

    def reliability(self) -> tuple[HypothesisReliability, dict[str, HypothesisReliability]]:
        """The model's binned hypotheses, and each reference row's.

        Raises:
            ValueError: before any nodule was added.
        """
        if not self._model:
            raise ValueError("NoduleHypotheses.reliability() called before any nodule was added.")
        options = {"n_bins": self.n_bins, "min_probability": self.min_probability}
        return (
            hypothesis_reliability(self._model, **options),
            {row: hypothesis_reliability(scored, **options) for row, scored in self._rows.items()},
        )
