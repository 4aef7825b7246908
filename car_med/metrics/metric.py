"""What the per-image metrics share: the reduction of per-image values and the MONAI cumulative base class."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import MetricReduction

from car_med.metrics.pairwise import DEFAULT_MAX_ELEMENTS

__all__ = ["PairwiseIoUMetric", "PerImageMetric", "reduce_per_image"]


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


class PairwiseIoUMetric(PerImageMetric):
    """A per-image metric computed by one functional form on the pairwise-IoU kernel (GED, HM-IoU, diversity).

    It holds the kernel's settings and passes them, with any options of the subclass, to ``function(y_pred,
    y, ...)``; a call's ``label_weights`` keyword overrides the constructor's where the function takes one.

    Args:
        classes: class ids the IoU is taken over.
        ignore_index: label value(s) excluded.
        num_classes: optional bound, checked on class ids and map values.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        max_elements: memory bound for the pairwise kernel.
        **options: further keywords of ``function`` (e.g. ``unbiased``, ``label_weights``).
    """

    function: ClassVar[Callable[..., torch.Tensor]]
    needs_labels: ClassVar[bool] = True

    def __init__(
        self,
        classes: int | Sequence[int] = (1,),
        ignore_index: int | Sequence[int] | None = None,
        num_classes: int | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        **options: Any,
    ) -> None:
        super().__init__(reduction)
        self.classes = classes
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.max_elements = max_elements
        self.options = options

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None and self.needs_labels:
            raise ValueError(f"{type(self).__name__} needs labels: call metric(y_pred=samples, y=labels).")
        options = dict(self.options, max_elements=self.max_elements)
        if "label_weights" in options and "label_weights" in kwargs:
            options["label_weights"] = kwargs["label_weights"]
        return type(self).function(
            y_pred, y, classes=self.classes, ignore_index=self.ignore_index, num_classes=self.num_classes, **options
        )
