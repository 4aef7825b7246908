"""What the per-image metrics share: the reduction of per-image values and the MONAI cumulative base class."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import MetricReduction

__all__ = ["PerImageMetric", "reduce_per_image"]


def reduce_per_image(values: torch.Tensor, reduction: MetricReduction | str) -> torch.Tensor:
    """Reduce a ``(B,)`` buffer of per-image values: ``"mean"``/``"sum"`` give a scalar, ``"none"`` returns it.

    NaN entries (images where the metric is undefined) are left out of the mean and sum.
    """
    reduction = MetricReduction(reduction)
    if reduction == MetricReduction.NONE:
        return values
    valid = values[~torch.isnan(values)]
    if reduction in (MetricReduction.MEAN, MetricReduction.MEAN_BATCH, MetricReduction.MEAN_CHANNEL):
        return valid.mean() if valid.numel() else torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return valid.sum()


class PerImageMetric(CumulativeIterationMetric):
    """A cumulative metric whose ``_compute_tensor`` returns one value per image, buffered and synced by MONAI."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        self.reduction = MetricReduction(reduction)

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        """Reduce the per-image values of every rank.

        Args:
            reduction: ``"mean"`` (over images, the default), ``"sum"`` or ``"none"`` (the ``(num_images,)``
                values); defaults to the constructor's.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{self.__class__.__name__}.aggregate() called before any batch was added.")
        return reduce_per_image(data.reshape(-1), reduction or self.reduction)
