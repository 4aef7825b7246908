"""car-med: Calibrated Adversarial Refinement (Kassapis et al., ICCV 2021) on MONAI."""

from __future__ import annotations

__version__ = "0.1.0"
