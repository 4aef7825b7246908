"""Names of what CAR's stage-2 engine puts in ``engine.state.output``, once, for trainer, handlers and bundles."""

from __future__ import annotations

from monai.utils import CommonKeys, StrEnum

__all__ = ["CARKeys"]


class CARKeys(StrEnum):
    """Keys of :class:`~car_med.engines.CARTrainer`'s iteration output (like MONAI's ``GanKeys``).

    ``IMAGE``, ``LABEL``, ``PRED`` and ``LOSS`` carry MONAI's ``CommonKeys`` values, so handlers written
    for ``SupervisedTrainer`` (``from_engine(["pred", "label"])``, ``output_transform=lambda o: o["loss"]``)
    work unchanged: ``PRED`` is Gbar, the mean of G's M softmax samples, and ``LOSS`` is G's total loss.
    """

    IMAGE = CommonKeys.IMAGE
    LABEL = CommonKeys.LABEL
    PRED = CommonKeys.PRED
    LOSS = CommonKeys.LOSS
    SAMPLES = "samples"
    CALIBRATION = "calibration"
    LOSS_F = "loss_f"
    LOSS_G = "loss_g"
    LOSS_ADV = "loss_adv"
    LOSS_CAL = "loss_cal"
    LOSS_CE = "loss_ce"
    LOSS_D = "loss_d"
    LOSS_R1 = "loss_r1"
    D_ACCURACY = "d_accuracy"
    D_STEPPED = "d_stepped"
