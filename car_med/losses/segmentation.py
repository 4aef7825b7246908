"""Pixelwise cross-entropy for F (eq. 2) that accepts MONAI-style channel-first labels."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["pixelwise_cross_entropy", "PixelwiseCrossEntropyLoss"]


def _as_index_map(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # MONAI pipelines carry labels as (B, 1, *spatial); torch's CE wants (B, *spatial) integers.
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != logits.ndim - 1 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"pixelwise cross-entropy expected labels (B, 1, *spatial) or (B, *spatial) matching logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}."
        )
    if target.is_floating_point():
        rounded = target.round()
        if not torch.equal(rounded, target):
            raise ValueError("pixelwise cross-entropy expected integer class labels, got non-integer floats.")
        target = rounded
    return target.long()


def pixelwise_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
) -> torch.Tensor:
    """Mean categorical cross-entropy over every labelled pixel.

    Args:
        logits: F's raw outputs ``(B, C, *spatial)``.
        target: class indices ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        ignore_index: label value excluded from the mean (e.g. 24 for Cityscapes' ignore class).
    """
    index_map = _as_index_map(logits, target)
    num_classes = logits.shape[1]
    valid = index_map != ignore_index if ignore_index is not None else torch.ones_like(index_map, dtype=torch.bool)
    bad = valid & ((index_map < 0) | (index_map >= num_classes))
    if bad.any():
        raise ValueError(
            f"label values must be in [0, {num_classes - 1}] (or ignore_index={ignore_index}), "
            f"found {sorted(index_map[bad].unique().tolist())[:5]}."
        )
    return F.cross_entropy(logits, index_map, ignore_index=-100 if ignore_index is None else ignore_index)


class PixelwiseCrossEntropyLoss(_Loss):
    """Module form of :func:`pixelwise_cross_entropy`, usable as a MONAI trainer ``loss_function``."""

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pixelwise_cross_entropy(logits, target, self.ignore_index)
