"""Glue between CAR's engine outputs and MONAI's ``MLFlowHandler``.

MONAI's default MLflow settings expect one ``loss`` entry; CAR's stage 2 returns several (G, D,
L_adv, L_cal, R1), so the bundles pass :class:`LossesForTracking` as ``output_transform``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from car_med.engines.keys import CARKeys

__all__ = ["LossesForTracking", "every_n_iterations", "sqlite_tracking_uri"]

_TRACKED_EXTRA = (CARKeys.D_ACCURACY, CARKeys.D_STEPPED)


class LossesForTracking:
    """Pick the scalar losses out of an engine output and give them stable metric names.

    Every scalar whose key starts with ``loss`` is kept, plus ``d_accuracy`` and ``d_stepped``. CAR's
    ``loss`` repeats ``loss_g`` (MONAI's key for the total loss), so it is left out when ``loss_g`` is
    there, unless ``rename`` names it.

    Args:
        rename: map from output key to MLflow metric name, e.g. ``{"loss": "loss_f"}`` for stage 1.
    """

    def __init__(self, rename: Mapping[str, str] | None = None) -> None:
        self.rename = dict(rename or {})

    def __call__(self, output: Any) -> dict[str, float] | None:
        if isinstance(output, (list, tuple)):
            # a decollated output repeats the batch loss in every item
            output = output[0] if output else None
        if not isinstance(output, Mapping):
            return None
        tracked: dict[str, float] = {}
        for key, value in output.items():
            if not (str(key).startswith("loss") or key in _TRACKED_EXTRA):
                continue
            if key == CARKeys.LOSS and key not in self.rename and CARKeys.LOSS_G in output:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)) and math.isfinite(value):
                tracked[self.rename.get(key, key)] = float(value)
        return tracked or None


def every_n_iterations(n: int) -> Callable[[Any, int], bool]:
    """Event filter for ``MLFlowHandler(iteration_log=...)``: log every ``n``-th iteration only.

    Logging every iteration to SQLite costs more than a toy training step.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return lambda engine, event: event % n == 0


def sqlite_tracking_uri(output_dir: str) -> str:
    """``sqlite:///<abs output_dir>/mlflow.db`` (MLflow 3 refuses the old file store), creating the folder."""
    folder = Path(output_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"
