"""Ignite handlers used by the bundles: experiment tracking transforms and the toy likelihood probe."""

from __future__ import annotations

from .toy_likelihood import ToyLikelihoodHandler
from .tracking import LossesForTracking, every_n_iterations, sqlite_tracking_uri

__all__ = ["LossesForTracking", "ToyLikelihoodHandler", "every_n_iterations", "sqlite_tracking_uri"]
