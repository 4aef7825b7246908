"""car_med.networks."""

from __future__ import annotations

from car_med.networks.calibration import BlackBoxCalibrationNet, SegNetCalibrationNet
from car_med.networks.discriminator import Discriminator
from car_med.networks.factory import build_network, spec_to_target_config
from car_med.networks.refinement import NoiseInjectedUNet, NoiseInjection
from car_med.networks.single_sample import CARSingleSample
from car_med.networks.toy import ToyCalibrationMLP, ToyDiscriminatorMLP, ToyRefinementMLP

__all__ = [
    "BlackBoxCalibrationNet",
    "CARSingleSample",
    "Discriminator",
    "NoiseInjectedUNet",
    "NoiseInjection",
    "SegNetCalibrationNet",
    "ToyCalibrationMLP",
    "ToyDiscriminatorMLP",
    "ToyRefinementMLP",
    "build_network",
    "spec_to_target_config",
]
