"""Pixelwise cross-entropy for F (eq. 2) that accepts MONAI-style channel-first labels or soft class shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["class_index_map", "pixelwise_cross_entropy", "PixelwiseCrossEntropyLoss"]


def class_index_map(
    target: torch.Tensor,
    batch: int,
    spatial: Sequence[int],
    num_classes: int,
    ignore_index: int | None = None,
    name: str = "label",
) -> torch.Tensor:
    """Validate integer class labels and return them as a ``(B, *spatial)`` long tensor.

    MONAI pipelines carry one label as ``(B, 1, *spatial)``; ``(B, *spatial)`` is accepted too. Floats
    are accepted only when they hold whole numbers (a resampled or soft label would be silently
    truncated otherwise).

    Raises:
        ValueError: wrong shape, non-integer values, or a class outside ``[0, num_classes)`` that is
            not ``ignore_index``; the message names ``name`` and what was expected.
    """
    spatial = tuple(spatial)
    if target.ndim == len(spatial) + 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != len(spatial) + 1 or target.shape[0] != batch or tuple(target.shape[1:]) != spatial:
        raise ValueError(
            f"{name}: expected one class-index map per image, shape (B={batch}, 1, {', '.join(map(str, spatial))}) "
            f"or (B, {', '.join(map(str, spatial))}), got {tuple(target.shape)}."
        )
    if target.is_floating_point():
        rounded = target.round()
        if not torch.equal(rounded, target):
            raise ValueError(f"{name}: expected integer class labels, got non-integer floats.")
        target = rounded
    index_map = target.long()
    valid = index_map != ignore_index if ignore_index is not None else torch.ones_like(index_map, dtype=torch.bool)
    bad = valid & ((index_map < 0) | (index_map >= num_classes))
    if bad.any():
        raise ValueError(
            f"{name}: label values must be in [0, {num_classes - 1}] (or ignore_index={ignore_index}), "
            f"found {sorted(index_map[bad].unique().tolist())[:5]}."
        )
    return index_map


def pixelwise_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
) -> torch.Tensor:
    """Mean categorical cross-entropy over every labelled pixel.

    Args:
        logits: F's raw outputs ``(B, C, *spatial)``.
        target: class indices ``(B, 1, *spatial)`` or ``(B, *spatial)``; or, with ``C > 1`` channels, a soft
            target of ``logits``' shape whose values lie in [0, 1] and sum to 1 over dim 1, such as the readers'
            class shares (:class:`~car_med.data.ReaderSharesd`). A soft target's cross-entropy is minimised by
            F equal to that target, as the expected one-reader cross-entropy is.
        ignore_index: label value excluded from the mean (e.g. 24 for Cityscapes' ignore class); integer
            targets only.
    """
    if target.shape == logits.shape and logits.shape[1] > 1 and target.is_floating_point():
        if ignore_index is not None:
            raise ValueError("ignore_index applies to class-index targets only, not to soft (class-share) targets.")
        sums = target.sum(dim=1).float()
        if target.min() < 0 or target.max() > 1 or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ValueError(
                f"soft target {tuple(target.shape)}: expected class shares in [0, 1] that sum to 1 over dim 1, got "
                f"values in [{float(target.min()):.3g}, {float(target.max()):.3g}] and sums in "
                f"[{float(sums.min()):.3g}, {float(sums.max()):.3g}]."
            )
        return F.cross_entropy(logits, target.to(logits.dtype))
    index_map = class_index_map(target, logits.shape[0], logits.shape[2:], logits.shape[1], ignore_index)
    return F.cross_entropy(logits, index_map, ignore_index=-100 if ignore_index is None else ignore_index)


class PixelwiseCrossEntropyLoss(_Loss):
    """Module form of :func:`pixelwise_cross_entropy`, usable as a MONAI trainer ``loss_function``."""

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pixelwise_cross_entropy(logits, target, self.ignore_index)
