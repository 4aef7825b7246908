"""The tiny CAR model of tests/registry/tiny_registry.py registered as ``models:/car-lidc/1`` in a SQLite store:
the model the export and prediction tests run (each folder's conftest makes it once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "registry"))


def register_tiny_car(root: Path) -> dict[str, str]:
    """Register the untrained tiny F and G under ``root``.

    Returns:
        ``{"uri": "models:/car-lidc/1", "tracking_uri": "sqlite:///<root>/mlflow.db"}``.
    """
    from tiny_registry import NOISE_DIM, tiny_car_model

    from car_med.registry import register_car_model

    uri = f"sqlite:///{root / 'mlflow.db'}"
    f, g, f_config, g_config = tiny_car_model()
    register_car_model(
        f,
        g,
        f_config,
        g_config,
        noise_dim=NOISE_DIM,
        tracking_uri=uri,
        artifact_location=str(root / "artifacts"),
        work_dir=str(root),
    )
    return {"uri": "models:/car-lidc/1", "tracking_uri": uri}
