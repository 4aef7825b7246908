"""Ignite handlers used by the bundles: experiment tracking transforms and the toy likelihood probe."""

from __future__ import annotations

from .registration import register_trained_model
from .toy_likelihood import ToyLikelihoodHandler
from .tracking import LossesForTracking, every_n_iterations, sqlite_tracking_uri
from .validation import SampleValidation

__all__ = [
    "LossesForTracking",
    "SampleValidation",
    "ToyLikelihoodHandler",
    "every_n_iterations",
    "register_trained_model",
    "sqlite_tracking_uri",
]
