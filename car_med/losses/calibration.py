"""The calibration loss L_cal (eq. 6 of the CAR paper) and its Gaussian form for regression."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

__all__ = [
    "categorical_calibration_loss",
    "gaussian_calibration_loss",
    "CategoricalCalibrationLoss",
    "GaussianCalibrationLoss",
]


def categorical_calibration_loss(
    sample_probs: torch.Tensor,
    calibration_probs: torch.Tensor,
    *,
    clamp: float = 1e-3,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(Gbar || F) between the mean of G's softmax samples and F's softmax.

    Args:
        sample_probs: G's softmax outputs with the sample axis on dim 1, ``(B, M, C, *spatial)``.
        calibration_probs: F's softmax ``(B, C, *spatial)``. It is detached: L_cal must never
            train F (paper section 3.3).
        clamp: both distributions are clamped to ``[clamp, 1 - clamp]`` before the logs, as the
            authors' code does, so a confident F cannot make the loss explode.
        valid_mask: optional ``(B, *spatial)`` boolean map; pixels outside it (e.g. the ignore
            class) do not count.

    Returns:
        Scalar: the KL summed over classes and averaged over valid pixels.
    """
    if sample_probs.ndim != calibration_probs.ndim + 1:
        raise ValueError(
            "categorical_calibration_loss expected sample_probs (B, M, C, *spatial) and calibration_probs "
            f"(B, C, *spatial), got {tuple(sample_probs.shape)} and {tuple(calibration_probs.shape)}."
        )
    if sample_probs.shape[:1] + sample_probs.shape[2:] != calibration_probs.shape:
        raise ValueError(
            f"sample_probs {tuple(sample_probs.shape)} and calibration_probs {tuple(calibration_probs.shape)} "
            "disagree on batch, class or spatial size."
        )
    mean_probs = sample_probs.mean(dim=1).clamp(clamp, 1.0 - clamp)
    target = calibration_probs.detach().clamp(clamp, 1.0 - clamp)
    kl_map = (mean_probs * (mean_probs.log() - target.log())).sum(dim=1)
    if valid_mask is None:
        return kl_map.mean()
    valid = valid_mask.to(kl_map.dtype)
    if valid.shape != kl_map.shape:
        raise ValueError(f"valid_mask must have shape {tuple(kl_map.shape)}, got {tuple(valid.shape)}.")
    return (kl_map * valid).sum() / valid.sum().clamp_min(1.0)


def gaussian_calibration_loss(samples: torch.Tensor, calibration_mean: torch.Tensor) -> torch.Tensor:
    """0.5 * MSE between the mean of G's samples and F's prediction (Gaussian likelihood, unit scale).

    Args:
        samples: ``(B, M, *feature)`` regression samples of G.
        calibration_mean: ``(B, *feature)`` output of F; detached.
    """
    if samples.shape[:1] + samples.shape[2:] != calibration_mean.shape:
        raise ValueError(
            f"gaussian_calibration_loss expected samples (B, M, *feature) matching calibration (B, *feature), "
            f"got {tuple(samples.shape)} and {tuple(calibration_mean.shape)}."
        )
    return 0.5 * nn.functional.mse_loss(samples.mean(dim=1), calibration_mean.detach())


class CategoricalCalibrationLoss(_Loss):
    """Module form of :func:`categorical_calibration_loss`."""

    def __init__(self, clamp: float = 1e-3) -> None:
        super().__init__()
        if not 0.0 <= clamp < 0.5:
            raise ValueError(f"clamp must be in [0, 0.5), got {clamp}.")
        self.clamp = clamp

    def forward(
        self, sample_probs: torch.Tensor, calibration_probs: torch.Tensor, valid_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return categorical_calibration_loss(sample_probs, calibration_probs, clamp=self.clamp, valid_mask=valid_mask)


class GaussianCalibrationLoss(_Loss):
    """Module form of :func:`gaussian_calibration_loss` (the toy regression's L_cal)."""

    def forward(
        self, samples: torch.Tensor, calibration_mean: torch.Tensor, valid_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return gaussian_calibration_loss(samples, calibration_mean)
