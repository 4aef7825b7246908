"""Hungarian-matched IoU (HM-IoU): the optimal 1:1 matching between N samples and the R labels tiled N / R times."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from car_med.metrics.metric import PairwiseIoUMetric
from car_med.metrics.pairwise import DEFAULT_MAX_ELEMENTS, check_label_maps, pairwise_iou

__all__ = ["hungarian_matched_iou", "matched_iou_from_matrix", "HungarianMatchedIoU"]


def matched_iou_from_matrix(iou_sy: torch.Tensor) -> torch.Tensor:
    """HM-IoU per image from a precomputed ``(B, N, R)`` sample-vs-label IoU matrix.

    The labels are tiled ``N / R`` times to an ``N x N`` matrix, ``scipy.optimize.linear_sum_assignment`` solves
    the assignment with cost ``1 - IoU``, and the score is the mean IoU of the matched pairs.

    Raises:
        ValueError: when N is not a multiple of R.
    """
    if iou_sy.ndim != 3:
        raise ValueError(f"iou_sy must have shape (B, N, R), got {tuple(iou_sy.shape)}.")
    batch, n, r = iou_sy.shape
    if n % r != 0:
        raise ValueError(
            f"HM-IoU needs the number of samples N to be a multiple of the number of labels R, "
            f"got N={n}, R={r} (samples (B, N, ...) with N={n}, labels (B, R, ...) with R={r})."
        )
    tiled = iou_sy.detach().cpu().numpy().astype(np.float64, copy=False)
    tiled = np.tile(tiled, (1, 1, n // r))
    scores = np.empty(batch, dtype=np.float64)
    for b in range(batch):
        rows, cols = linear_sum_assignment(1.0 - tiled[b])
        scores[b] = tiled[b][rows, cols].mean()
    return torch.as_tensor(scores, device=iou_sy.device)


def hungarian_matched_iou(
    samples: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: int | Sequence[int] = (1,),
    ignore_index: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Per-image Hungarian-matched IoU between N hard samples and R labels (N a multiple of R).

    The pairwise IoU follows the same class, empty-pair and ignore rules as the GED
    (:func:`car_med.metrics.pairwise.pairwise_iou`). Only the ``N x R`` sample-label IoUs are computed; tiling
    the labels ``N / R`` times repeats those columns, so the ``N x N`` cost matrix costs nothing extra.

    Args:
        samples: hard samples, integer ``(B, N, *spatial)``.
        labels: labels, integer ``(B, R, *spatial)``.
        classes: class ids the IoU is taken over.
        ignore_index: label value(s) whose pixels are excluded.
        num_classes: optional bound, checked on class ids and map values.
        max_elements: memory bound for the pairwise kernel.

    Returns:
        ``(B,)`` float64 mean matched IoU per image.

    Raises:
        ValueError: on invalid inputs, or when N is not a multiple of R.
    """
    samples, labels, _, _ = check_label_maps(samples, labels, classes, ignore_index, num_classes)
    n, r = samples.shape[1], labels.shape[1]
    if n % r != 0:
        raise ValueError(
            f"HM-IoU needs N to be a multiple of R: samples {tuple(samples.shape)} have N={n}, "
            f"labels {tuple(labels.shape)} have R={r}."
        )
    iou = pairwise_iou(
        samples,
        labels,
        classes=classes,
        ignore_index=ignore_index,
        blocks=("sy",),
        max_elements=max_elements,
    )
    return matched_iou_from_matrix(iou.sy)


class HungarianMatchedIoU(PairwiseIoUMetric):
    """HM-IoU as a MONAI cumulative metric: ``metric(y_pred=samples, y=labels)`` per batch, then ``aggregate()``.

    Per-image scores are buffered and gathered across DDP ranks by the base class; ``aggregate()`` averages them.
    Arguments as in :class:`~car_med.metrics.metric.PairwiseIoUMetric`.
    """

    function = staticmethod(hungarian_matched_iou)
