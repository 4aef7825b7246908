"""Validation during CAR's stage 2 on stochastic Cityscapes: GED against the 32 weighted modes and the
per-class calibration offsets, with the best checkpoint kept (as :class:`~car_med.handlers.SampleValidation`)."""

from __future__ import annotations

from typing import Any

from car_med.evaluation.cityscapes import CityscapesMetricSuite
from car_med.handlers.validation import SampleValidation

__all__ = ["CityscapesSampleValidation"]


class CityscapesSampleValidation(SampleValidation):
    """:class:`~car_med.handlers.SampleValidation` with the Cityscapes metrics of :class:`CityscapesMetricSuite`.

    Reported as ``val_ged<n>``, ``val_diversity<n>``, ``val_f_mean_offset``, ``val_g_mean_offset``,
    ``val_g_noise_response`` (whether G uses its noise), the per-class offsets and ``val_ece``. During training
    F's offsets are taken over all pixels (the batch does not reach the suite with the black box);
    ``evaluate.json`` uses the authors' black-box-correct pixels.
    One process only (the suite keeps its per-image values in memory, not in MONAI's DDP buffers). No montage.

    Args:
        calibration_network, refinement_network, data_loader, interval, num_samples, seed, device, max_batch,
            noise_std, save_dict, best_checkpoint, mlflow_handler, history_file: as in ``SampleValidation``.
        key_metric: the metric that picks the best checkpoint (lower is better): ``ged<num_samples>`` by default,
            or ``g_mean_offset``.
        absent_class: the GED's absent-class convention (``"skip"``, the authors', or ``"one"``).
        ece_bins: bins of F's ECE.
    """

    def __init__(
        self,
        calibration_network: Any,
        refinement_network: Any,
        data_loader: Any,
        interval: int,
        num_samples: int = 16,
        key_metric: str | None = None,
        absent_class: str = "skip",
        ece_bins: int = 10,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("montage_dir", None)
        kwargs.pop("montage_cases", None)
        kwargs.pop("reference_rows", None)
        super().__init__(
            calibration_network,
            refinement_network,
            data_loader,
            interval,
            num_samples=num_samples,
            key_metric=f"ged{num_samples}",
            montage_dir=None,
            reference_rows=(),  # the LIDC reference rows (readers' oracle, majority vote) mean nothing here
            **kwargs,
        )
        self.suite = CityscapesMetricSuite(
            ged_counts=(num_samples,), calibration_count=num_samples, ece_bins=ece_bins, absent_class=absent_class
        )
        key_metric = key_metric or f"ged{num_samples}"
        if key_metric not in self.suite.names:
            raise ValueError(f"key_metric must be one of {self.suite.names}, got {key_metric!r}.")
        self.key_metric = key_metric
        self.higher_is_better = False
