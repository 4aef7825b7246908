"""The tiny CAR networks of tests/tiny_car.py with the bundle-style configs that rebuild them, and HU batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import numpy as np
from mlflow.tracking._tracking_service import utils as tracking_utils
from tiny_car import make_tiny_nets

NOISE_DIM = 4


def tiny_configs(noise_dim: int = NOISE_DIM) -> tuple[dict, dict]:
    """Configs of F and G exactly as ``make_tiny_nets`` builds them."""
    f_config = {
        "_target_": "car_med.networks.SegNetCalibrationNet",
        "in_channels": 1,
        "out_channels": 2,
        "channels": [8, 16],
        "convs_per_block": [1, 1],
        "dropout": 0.0,
    }
    g_config = {
        "_target_": "car_med.networks.NoiseInjectedUNet",
        "image_channels": 1,
        "num_classes": 2,
        "noise_dim": noise_dim,
        "channels": [8, 16, 16, 16],
        "dropout": 0.0,
    }
    return f_config, g_config


def tiny_car_model(seed: int = 0, noise_dim: int = NOISE_DIM):
    """``(F, G, F config, G config)``, seeded."""
    f, g, _ = make_tiny_nets(seed=seed, noise_dim=noise_dim)
    return (f, g, *tiny_configs(noise_dim))


def hu_batch(batch: int = 2, size: int = 16, seed: int = 0) -> np.ndarray:
    """float32 HU slices ``(B, 1, size, size)`` spanning [-1500, 900], so some pixels fall outside the window."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1500.0, 900.0, (batch, 1, size, size)).astype(np.float32)


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking (and registry) URI at ``uri`` for the block, then put back what was set."""
    previous = getattr(tracking_utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
