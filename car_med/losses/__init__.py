"""CAR's losses: cross-entropy for F, L_cal and the adversarial pair with R1."""

from __future__ import annotations

from .adversarial import (
    DiscriminatorLoss,
    GeneratorAdversarialLoss,
    discriminator_loss,
    generator_adversarial_loss,
    r1_penalty,
)
from .calibration import (
    CategoricalCalibrationLoss,
    GaussianCalibrationLoss,
    categorical_calibration_loss,
    gaussian_calibration_loss,
)
from .segmentation import PixelwiseCrossEntropyLoss, class_index_map, pixelwise_cross_entropy

__all__ = [
    "CategoricalCalibrationLoss",
    "DiscriminatorLoss",
    "GaussianCalibrationLoss",
    "GeneratorAdversarialLoss",
    "PixelwiseCrossEntropyLoss",
    "categorical_calibration_loss",
    "class_index_map",
    "discriminator_loss",
    "gaussian_calibration_loss",
    "generator_adversarial_loss",
    "pixelwise_cross_entropy",
    "r1_penalty",
]
