"""Generalised energy distance (GED) and sample diversity, with d(a, b) = 1 - IoU(a, b), and their MONAI metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from monai.utils import MetricReduction, convert_to_tensor

from car_med.metrics.metric import PairwiseIoUMetric
from car_med.metrics.pairwise import DEFAULT_MAX_ELEMENTS, PairwiseIoU, pairwise_iou

__all__ = [
    "EnergyDistanceTerms",
    "generalized_energy_distance",
    "energy_distance_from_iou",
    "sample_diversity",
    "GeneralizedEnergyDistance",
    "SampleDiversity",
]


class EnergyDistanceTerms(NamedTuple):
    """Per-image GED and its three terms, each ``(B,)`` float64.

    Attributes:
        ged: ``2 * d_sy - d_ss - d_yy``.
        d_sy: mean d(S, Y), weighted over labels when label weights are given.
        d_ss: mean d(S, S'), the sample diversity.
        d_yy: mean d(Y, Y'), weighted by ``w_r * w_r'`` when label weights are given.
    """

    ged: torch.Tensor
    d_sy: torch.Tensor
    d_ss: torch.Tensor
    d_yy: torch.Tensor


def _normalised_label_weights(label_weights: Any, batch: int, raters: int, device: torch.device) -> torch.Tensor:
    """Return ``(B, R)`` float64 weights that sum to 1 per image; uniform when ``label_weights`` is None."""
    if label_weights is None:
        return torch.full((batch, raters), 1.0 / raters, dtype=torch.float64, device=device)
    w = convert_to_tensor(label_weights, track_meta=False)
    if not isinstance(w, torch.Tensor) or w.dtype == torch.bool or w.is_complex():
        raise ValueError(f"label_weights must be a numeric tensor of shape (R,) or (B, R), got {label_weights!r}.")
    w = w.to(device=device, dtype=torch.float64)
    if w.ndim == 1 and w.shape[0] == raters:
        w = w.expand(batch, raters)
    if tuple(w.shape) != (batch, raters):
        raise ValueError(
            f"label_weights must have shape (R,) = ({raters},) or (B, R) = ({batch}, {raters}) to match labels, "
            f"got {tuple(w.shape)}."
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("label_weights must be finite and non-negative.")
    total = w.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("label_weights must have a positive sum for every image.")
    return w / total


def _mean_distance(d: torch.Tensor, unbiased: bool, name: str) -> torch.Tensor:
    """Mean of ``(B, K, K)`` distances over the full matrix, or over its off-diagonal part when unbiased."""
    k = d.shape[-1]
    if not unbiased:
        return d.mean(dim=(1, 2))
    if k < 2:
        raise ValueError(f"unbiased=True needs at least 2 {name} per image to exclude the diagonal, got {k}.")
    off = ~torch.eye(k, dtype=torch.bool, device=d.device)
    return (d * off).sum(dim=(1, 2)) / (k * (k - 1))


def generalized_energy_distance(
    samples: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: int | Sequence[int] = (1,),
    ignore_index: int | Sequence[int] | None = None,
    label_weights: torch.Tensor | Sequence[float] | None = None,
    unbiased: bool = False,
    return_terms: bool = False,
    num_classes: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor | EnergyDistanceTerms:
    """Per-image generalised energy distance ``2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` with d = 1 - IoU.

    The IoU of a pair is averaged over ``classes``; a class absent from both maps is skipped and a pair with every
    class absent has IoU 1 (see :func:`car_med.metrics.pairwise.pairwise_iou`, which also defines how
    ``ignore_index`` masks each pair). With ``classes=(1,)`` this is the LIDC convention.

    By default the expectations are the means over the full matrices, diagonals included: the biased estimator
    every published number uses. ``unbiased=True`` drops the diagonals of the S-S' and Y-Y' matrices
    (normalising by ``N (N - 1)`` and, with weights, by ``sum_{r != r'} w_r w_r'``); the S-Y term has no diagonal
    and is unchanged.

    Args:
        samples: hard samples (argmax maps), integer ``(B, N, *spatial)``.
        labels: annotator labels or ground-truth modes, integer ``(B, R, *spatial)``.
        classes: class ids the IoU is taken over.
        ignore_index: label value(s) whose pixels are excluded.
        label_weights: ``(R,)`` or ``(B, R)`` probabilities of the labels (e.g. the 32 analytic Cityscapes modes);
            normalised to sum 1 per image. They weight d(S, Y) by ``w_r`` and d(Y, Y') by ``w_r w_r'``.
            None gives every label weight ``1 / R``.
        unbiased: exclude the diagonals of the S-S' and Y-Y' matrices.
        return_terms: also return the three terms, as :class:`EnergyDistanceTerms`.
        num_classes: optional bound; class ids and map values outside ``[0, num_classes)`` raise.
        max_elements: memory bound for the pairwise kernel.

    Returns:
        ``(B,)`` float64 GED per image, or :class:`EnergyDistanceTerms` when ``return_terms``.

    Raises:
        ValueError: on invalid shapes, dtypes, class ids or weights.
    """
    iou = pairwise_iou(
        samples,
        labels,
        classes=classes,
        ignore_index=ignore_index,
        blocks=("sy", "ss", "yy"),
        num_classes=num_classes,
        max_elements=max_elements,
    )
    terms = energy_distance_from_iou(iou, label_weights=label_weights, unbiased=unbiased)
    return terms if return_terms else terms.ged


def energy_distance_from_iou(
    iou: PairwiseIoU,
    *,
    label_weights: torch.Tensor | Sequence[float] | None = None,
    unbiased: bool = False,
) -> EnergyDistanceTerms:
    """GED and its terms from precomputed IoU matrices (all three blocks of :func:`pairwise_iou`).

    Lets an evaluator compute the pairwise IoUs once and derive both GED and HM-IoU
    (:func:`car_med.metrics.matched_iou_from_matrix` on ``iou.sy``). Arguments as in
    :func:`generalized_energy_distance`.
    """
    if iou.sy is None or iou.ss is None or iou.yy is None:
        raise ValueError("energy_distance_from_iou needs the 'sy', 'ss' and 'yy' blocks of pairwise_iou.")
    d_sy_m, d_ss_m, d_yy_m = 1.0 - iou.sy, 1.0 - iou.ss, 1.0 - iou.yy
    batch, _, raters = d_sy_m.shape
    w = _normalised_label_weights(label_weights, batch, raters, d_sy_m.device)

    d_sy = (d_sy_m.mean(dim=1) * w).sum(dim=1)
    d_ss = _mean_distance(d_ss_m, unbiased, "samples")
    ww = w[:, :, None] * w[:, None, :]
    if unbiased:
        if raters < 2:
            raise ValueError(f"unbiased=True needs at least 2 labels per image to exclude the diagonal, got {raters}.")
        off = ~torch.eye(raters, dtype=torch.bool, device=ww.device)
        norm = (ww * off).sum(dim=(1, 2))
        if bool((norm <= 0).any()):
            raise ValueError("unbiased=True needs at least two labels with positive weight per image.")
        d_yy = (ww * off * d_yy_m).sum(dim=(1, 2)) / norm
    else:
        d_yy = (ww * d_yy_m).sum(dim=(1, 2))
    return EnergyDistanceTerms(2.0 * d_sy - d_ss - d_yy, d_sy, d_ss, d_yy)


def sample_diversity(
    samples: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    classes: int | Sequence[int] = (1,),
    ignore_index: int | Sequence[int] | None = None,
    unbiased: bool = False,
    num_classes: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Per-image sample diversity, the mean d(S, S') = 1 - IoU over all sample pairs (the GED's S-S' term).

    Args:
        samples: hard samples, integer ``(B, N, *spatial)``.
        labels: optional labels ``(B, R, *spatial)``, used only for their ignore masks (pixels ignored in any label
            are excluded, as in the GED's S-S' term). Required when ``ignore_index`` is set.
        classes: class ids the IoU is taken over.
        ignore_index: label value(s) whose pixels are excluded.
        unbiased: exclude the diagonal (a sample against itself).
        num_classes: optional bound on class ids and values.
        max_elements: memory bound for the pairwise kernel.

    Returns:
        ``(B,)`` float64.
    """
    if ignore_index is not None and labels is None:
        raise ValueError("sample_diversity with ignore_index needs labels to know which pixels are ignored.")
    iou = pairwise_iou(
        samples,
        labels,
        classes=classes,
        ignore_index=ignore_index,
        blocks=("ss",),
        num_classes=num_classes,
        max_elements=max_elements,
    )
    return _mean_distance(1.0 - iou.ss, unbiased, "samples")


class GeneralizedEnergyDistance(PairwiseIoUMetric):
    """GED as a MONAI cumulative metric: ``metric(y_pred=samples, y=labels)`` per batch, then ``aggregate()``.

    ``y_pred`` is the hard samples ``(B, N, *spatial)`` and ``y`` the labels ``(B, R, *spatial)``, both integer
    (a list of ``(N, *spatial)`` / ``(R, *spatial)`` items works too). Per-image GEDs are buffered and gathered
    across DDP ranks by :class:`monai.metrics.CumulativeIterationMetric`; ``aggregate()`` averages them over images.
    Works with :class:`monai.handlers.IgniteMetricHandler`.

    Args:
        classes: class ids the IoU is taken over; ``(1,)`` for LIDC, the 10 switchable classes for Cityscapes.
        ignore_index: label value(s) excluded, e.g. ``(24, 255)`` for Cityscapes.
        label_weights: fixed ``(R,)`` label probabilities used for every batch (the Cityscapes modes are enumerated
            in a fixed order, so their weights do not depend on the image). A ``label_weights`` keyword passed to
            ``__call__`` overrides it for that batch; give it as ``(R,)``, or as ``(B, R)`` with batch-first tensors
            (a list input is computed one item at a time, with the same keywords for every item).
        unbiased: exclude the diagonals of the S-S' and Y-Y' matrices.
        num_classes: optional bound, checked on class ids and map values.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        max_elements: memory bound for the pairwise kernel.

    Example::

        metric = GeneralizedEnergyDistance(classes=(1,))
        for batch in loader:
            metric(y_pred=batch["samples"], y=batch["label"])
        ged = metric.aggregate().item()
    """

    function = staticmethod(generalized_energy_distance)

    def __init__(
        self,
        classes: int | Sequence[int] = (1,),
        ignore_index: int | Sequence[int] | None = None,
        label_weights: torch.Tensor | Sequence[float] | None = None,
        unbiased: bool = False,
        num_classes: int | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        super().__init__(
            classes, ignore_index, num_classes, reduction, max_elements, label_weights=label_weights, unbiased=unbiased
        )
        self.label_weights = label_weights
        self.unbiased = unbiased


class SampleDiversity(PairwiseIoUMetric):
    """Mean d(S, S') per image as a MONAI cumulative metric; ``y`` is optional and used only for ignore masks.

    Args:
        classes: class ids the IoU is taken over.
        ignore_index: label value(s) excluded; then ``y`` must be given.
        unbiased: exclude the diagonal.
        num_classes: optional bound, checked.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        max_elements: memory bound for the pairwise kernel.
    """

    function = staticmethod(sample_diversity)
    needs_labels = False

    def __init__(
        self,
        classes: int | Sequence[int] = (1,),
        ignore_index: int | Sequence[int] | None = None,
        unbiased: bool = False,
        num_classes: int | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        super().__init__(classes, ignore_index, num_classes, reduction, max_elements, unbiased=unbiased)
        self.unbiased = unbiased
