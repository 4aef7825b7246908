"""Hypothesis calibration: does the probability a predictor gives an outline match how often readers draw it?

A predictor gives a lesion K *hypotheses*, distinct outlines each with a probability q (CAR's sample groups
from :func:`car_med.hypotheses.group_samples`, or one fixed mask with q = 1). They are scored against the
lesion's R reader masks (docs/metrics.md, "Hypothesis calibration"):

**Assignment.** Each reader mask goes to the hypothesis whose representative it overlaps most, among those with
IoU >= ``min_iou`` (ties: the more probable hypothesis, then the earlier one). A reader that overlaps no
representative that much is *unmatched*. The IoU follows the project's rule: two empty masks have IoU 1, so an
empty reader matches a "no lesion" hypothesis; exactly one empty mask gives IoU 0.

**Observed frequency.** A hypothesis scored against R readers, a of whom are assigned to it, was drawn by a
share a / R of them. A calibrated predictor's hypotheses of probability q are drawn by a share q on average.

**Bins and ECE.** The hypotheses of all lesions are pooled and binned by q into ``n_bins`` equal-width bins,
right-closed, ``(b / n_bins, (b + 1) / n_bins]`` as F's ECE (Guo et al. 2017). Per bin b with ``n_b`` hypotheses:
the mean probability ``q_b`` over them, and the observed frequency ``o_b = sum a / sum R`` over them (with the
same R for every lesion: the readers assigned to the bin's hypotheses over R x ``n_b``).
``ECE = sum_b n_b / N |q_b - o_b|``, N all hypotheses.

**Coverage.** The share of all reader masks assigned to a hypothesis with q >= ``min_probability`` (0.1 by
default); *uncovered* is the rest: readers matched to a rarer hypothesis or to none. *Unmatched* counts only the
readers matched to none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from car_med.hypotheses import DEFAULT_MIN_IOU
from car_med.metrics.pairwise import pairwise_iou

__all__ = [
    "DEFAULT_COVERAGE_PROBABILITY",
    "DEFAULT_HYPOTHESIS_BINS",
    "HypothesisReliability",
    "ScoredHypotheses",
    "hypothesis_reliability",
    "match_readers",
    "plot_hypothesis_reliability",
    "score_hypotheses",
]

#: equal-width probability bins of the hypothesis ECE
DEFAULT_HYPOTHESIS_BINS = 10
#: a reader counts as covered when it matches a hypothesis at least this probable
DEFAULT_COVERAGE_PROBABILITY = 0.1


def _as_masks(masks: Any, name: str) -> torch.Tensor:
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{name} must be masks (K, *spatial) as a numpy array or torch tensor, got {type(masks)}.")
    if masks.is_floating_point() or masks.is_complex():
        raise ValueError(
            f"{name} must be boolean or integer 0/1 masks (K, *spatial), got dtype {masks.dtype} with shape "
            f"{tuple(masks.shape)}; threshold or take the argmax first."
        )
    if masks.ndim < 2 or masks.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one mask (K, *spatial), got shape {tuple(masks.shape)}.")
    return masks.detach().cpu().bool()


def _as_probabilities(probabilities: Any, count: int) -> np.ndarray:
    q = np.asarray(torch.as_tensor(probabilities, dtype=torch.float64).cpu()).reshape(-1)
    if q.shape != (count,):
        raise ValueError(f"probabilities must give one value per representative ({count}), got shape {q.shape}.")
    if not np.all(np.isfinite(q)) or np.any(q < 0) or np.any(q > 1):
        raise ValueError(f"probabilities must lie in [0, 1], got {q.tolist()}.")
    return q


def match_readers(
    representatives: Any, probabilities: Any, readers: Any, *, min_iou: float = DEFAULT_MIN_IOU
) -> np.ndarray:
    """Assign each reader mask to the hypothesis it matches, or to none.

    Args:
        representatives: the hypotheses' outlines, boolean or 0/1 masks ``(K, *spatial)`` (2D or 3D).
        probabilities: the hypotheses' probabilities ``(K,)``, in [0, 1].
        readers: the readers' masks ``(R, *spatial)``, same spatial shape; an empty mask is a reader's "no lesion".
        min_iou: a reader matches a hypothesis when their IoU is at least this; in (0, 1].

    Returns:
        ``(R,)`` int64: per reader, the index of its hypothesis (the highest IoU among those >= ``min_iou``; ties:
        the more probable, then the lower index), or -1 when it matches none.

    Raises:
        TypeError: when masks are not arrays or tensors.
        ValueError: on float masks, no masks, differing spatial shapes, probabilities not one per representative
            or outside [0, 1], or ``min_iou`` outside (0, 1].

    Example:
        >>> import numpy as np
        >>> lesion = np.zeros((1, 4, 4), dtype=bool); lesion[0, 1:3, 1:3] = True
        >>> nothing = np.zeros((1, 4, 4), dtype=bool)
        >>> match_readers(np.concatenate([lesion, nothing]), [0.75, 0.25], np.concatenate([nothing, lesion]))
        array([1, 0])
    """
    reps = _as_masks(representatives, "representatives")
    ys = _as_masks(readers, "readers")
    if reps.shape[1:] != ys.shape[1:]:
        raise ValueError(
            f"representatives {tuple(reps.shape)} and readers {tuple(ys.shape)} must have the same spatial shape."
        )
    q = _as_probabilities(probabilities, reps.shape[0])
    if not 0 < min_iou <= 1:
        raise ValueError(f"min_iou must lie in (0, 1], got {min_iou}.")
    # the project's kernel: class 1 only, so two empty masks have IoU 1 and exactly one empty IoU 0
    iou = pairwise_iou(reps[None], ys[None], classes=(1,), blocks=("sy",)).sy[0].cpu().numpy()  # (K, R)
    matches = np.full(ys.shape[0], -1, dtype=np.int64)
    for r in range(ys.shape[0]):
        candidates = np.flatnonzero(iou[:, r] >= min_iou)
        if candidates.size:
            # highest IoU, then the more probable, then the lower index
            matches[r] = min(candidates, key=lambda k: (-iou[k, r], -q[k], k))
    return matches


@dataclass(frozen=True)
class ScoredHypotheses:
    """One lesion's hypotheses scored against its readers.

    Attributes:
        probabilities: ``(K,)`` the hypotheses' probabilities.
        matches: ``(R,)`` per reader, the index of its hypothesis or -1 (unmatched).
    """

    probabilities: np.ndarray
    matches: np.ndarray

    @property
    def assigned(self) -> np.ndarray:
        """``(K,)`` how many readers each hypothesis got."""
        matched = self.matches[self.matches >= 0]
        return np.bincount(matched, minlength=len(self.probabilities))

    @property
    def num_readers(self) -> int:
        """R: the readers scored against these hypotheses."""
        return int(self.matches.shape[0])


def score_hypotheses(
    representatives: Any, probabilities: Any, readers: Any, *, min_iou: float = DEFAULT_MIN_IOU
) -> ScoredHypotheses:
    """:func:`match_readers`, kept with the probabilities for :func:`hypothesis_reliability`."""
    matches = match_readers(representatives, probabilities, readers, min_iou=min_iou)
    count = _as_masks(representatives, "representatives").shape[0]
    return ScoredHypotheses(probabilities=_as_probabilities(probabilities, count), matches=matches)


@dataclass(frozen=True)
class HypothesisReliability:
    """Hypotheses of many lesions binned by their probability, against the readers assigned to them.

    Attributes:
        bin_edges: ``(n_bins + 1,)`` equal-width edges over [0, 1]; bins are right-closed (the first includes 0).
        probability: per bin, the mean probability of its hypotheses (NaN for an empty bin).
        observed: per bin, the readers assigned to its hypotheses over the readers they were scored against
            (NaN for an empty bin).
        count: hypotheses per bin.
        readers: per bin, the reader masks its hypotheses were scored against (R per hypothesis).
        assigned: per bin, the readers assigned to its hypotheses.
        ece: ``sum_b count_b / N |probability_b - observed_b|``.
        coverage: the share of all reader masks assigned to a hypothesis with probability >= ``min_probability``.
        unmatched: the share of all reader masks assigned to no hypothesis.
        hypotheses_per_lesion: the mean number of hypotheses per lesion.
        num_lesions: lesions scored.
        num_readers: reader masks scored, over all lesions.
        min_probability: the coverage threshold.
    """

    bin_edges: np.ndarray
    probability: np.ndarray
    observed: np.ndarray
    count: np.ndarray
    readers: np.ndarray
    assigned: np.ndarray
    ece: float
    coverage: float
    unmatched: float
    hypotheses_per_lesion: float
    num_lesions: int
    num_readers: int
    min_probability: float

    @property
    def uncovered(self) -> float:
        """The share of reader masks not assigned to a hypothesis with probability >= ``min_probability``."""
        return 1.0 - self.coverage

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (NaN as ``None``)."""

        def listed(values: np.ndarray) -> list:
            return [None if isinstance(v, float) and math.isnan(v) else v for v in values.tolist()]

        return {
            "ece": self.ece,
            "coverage": self.coverage,
            "uncovered": self.uncovered,
            "unmatched": self.unmatched,
            "hypotheses_per_lesion": self.hypotheses_per_lesion,
            "num_lesions": self.num_lesions,
            "num_readers": self.num_readers,
            "min_probability": self.min_probability,
            "bin_edges": self.bin_edges.tolist(),
            "probability": listed(self.probability),
            "observed": listed(self.observed),
            "count": self.count.tolist(),
            "readers": self.readers.tolist(),
            "assigned": self.assigned.tolist(),
        }


def hypothesis_reliability(
    scored: Sequence[ScoredHypotheses],
    *,
    n_bins: int = DEFAULT_HYPOTHESIS_BINS,
    min_probability: float = DEFAULT_COVERAGE_PROBABILITY,
) -> HypothesisReliability:
    """The hypothesis ECE, its per-bin table and the readers' coverage over many lesions.

    Args:
        scored: one :class:`ScoredHypotheses` per lesion (:func:`score_hypotheses`).
        n_bins: equal-width probability bins, right-closed ``(b / n_bins, (b + 1) / n_bins]``.
        min_probability: a reader is covered when it is assigned to a hypothesis at least this probable.

    Returns:
        :class:`HypothesisReliability`.

    Raises:
        ValueError: on no lesions, a lesion without hypotheses or readers, ``n_bins`` < 1 or ``min_probability``
            outside [0, 1].

    Example:
        >>> one = ScoredHypotheses(np.array([0.75, 0.25]), np.array([0, 0, 0, 1]))
        >>> hypothesis_reliability([one]).ece   # both hypotheses drawn by exactly their share of the 4 readers
        0.0
    """
    if not scored:
        raise ValueError("hypothesis_reliability needs at least one scored lesion, got none.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    if not 0 <= min_probability <= 1:
        raise ValueError(f"min_probability must lie in [0, 1], got {min_probability}.")
    q, assigned, readers = [], [], []
    covered = unmatched = total = 0
    for index, lesion in enumerate(scored):
        k, r = len(lesion.probabilities), lesion.num_readers
        if k < 1 or r < 1:
            raise ValueError(f"lesion {index}: needs at least one hypothesis and one reader, got {k} and {r}.")
        q.append(lesion.probabilities)
        assigned.append(lesion.assigned)
        readers.append(np.full(k, r))
        matched = lesion.matches >= 0
        covered += int((lesion.probabilities[lesion.matches[matched]] >= min_probability).sum())
        unmatched += int((~matched).sum())
        total += r
    q, assigned, readers = np.concatenate(q), np.concatenate(assigned), np.concatenate(readers)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted on the inner edges with side="left" gives (lo, hi]: a q equal to an edge goes to the lower bin
    index = np.searchsorted(edges[1:-1], q, side="left")
    count = np.bincount(index, minlength=n_bins)
    bin_readers = np.bincount(index, weights=readers, minlength=n_bins).astype(np.int64)
    bin_assigned = np.bincount(index, weights=assigned, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        probability = np.bincount(index, weights=q, minlength=n_bins) / count
        observed = bin_assigned / bin_readers
    filled = count > 0
    ece = float(np.sum(count[filled] / count.sum() * np.abs(probability[filled] - observed[filled])))
    return HypothesisReliability(
        bin_edges=edges,
        probability=probability,
        observed=observed,
        count=count,
        readers=bin_readers,
        assigned=bin_assigned,
        ece=ece,
        coverage=covered / total,
        unmatched=unmatched / total,
        hypotheses_per_lesion=len(q) / len(scored),
        num_lesions=len(scored),
        num_readers=total,
        min_probability=float(min_probability),
    )


def plot_hypothesis_reliability(
    curves: Mapping[str, HypothesisReliability],
    path: str | Path | None = None,
    *,
    title: str | None = "hypothesis calibration",
):
    """Reliability diagram of several predictors' hypotheses, with the hypotheses per bin below it.

    Top: per bin the mean probability (x) against the share of readers assigned (y), one curve per predictor
    (legend: ECE and uncovered share), the diagonal for perfect calibration. Bottom: how many hypotheses each
    bin holds, per predictor. Built on matplotlib's Agg canvas without pyplot.

    Args:
        curves: ``{label: HypothesisReliability}``, e.g. the model and the reference rows.
        path: if given, the figure is saved there.
        title: the top panel's title.

    Returns:
        The matplotlib Figure.
    """
    from car_med.visualize import isolate_matplotlib_config

    isolate_matplotlib_config()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_hypothesis_reliability needs at least one curve.")
    fig = Figure(figsize=(5.2, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1.3]}, sharex=True)
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    edges = next(iter(curves.values())).bin_edges
    width = (edges[1:] - edges[:-1]) / (len(curves) + 1)
    for position, (name, curve) in enumerate(curves.items()):
        keep = curve.count > 0
        (line,) = top.plot(
            curve.probability[keep],
            curve.observed[keep],
            marker="o",
            linewidth=1.2,
            label=f"{name} (ECE {curve.ece:.3f}, uncovered {curve.uncovered:.2f})",
        )
        left = curve.bin_edges[:-1] + (position + 0.5) * width
        bars = bottom.bar(left, curve.count, width=width, align="edge", color=line.get_color(), label=name)
        bottom.bar_label(bars, labels=[str(c) if c else "" for c in curve.count], fontsize=6, padding=1)
    top.set_xlim(-0.02, 1.02)
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("share of readers assigned")
    if title:
        top.set_title(title, fontsize=10)
    top.legend(fontsize=6.5, loc="upper left", title="predictor", title_fontsize=7)
    bottom.set_xlabel(f"hypothesis probability q ({len(edges) - 1} bins)")
    bottom.set_ylabel("hypotheses")
    bottom.set_xticks(edges)
    bottom.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
