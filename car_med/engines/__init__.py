"""Training engines: stage 1 is MONAI's SupervisedTrainer on F; stage 2 is :class:`CARTrainer`."""

from __future__ import annotations

from .allocator import retain_freed_memory
from .batches import F_TARGETS, PrepareBatchWithTarget, calibration_target_batch, calibration_target_shares_key
from .car_trainer import CARTrainer
from .checkpoints import (
    CheckedCheckpointLoader,
    check_state_dict,
    latest_checkpoint,
    load_car_networks,
    load_network_checkpoint,
)
from .d_schedule import DiscriminatorSchedule
from .guards import NonFiniteLossError, NonFiniteLossGuard, raise_if_non_finite
from .keys import CARKeys
from .rng import RandomState
from .stages import run_stage, stage_finished

__all__ = [
    "F_TARGETS",
    "CARKeys",
    "CARTrainer",
    "CheckedCheckpointLoader",
    "DiscriminatorSchedule",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PrepareBatchWithTarget",
    "RandomState",
    "calibration_target_batch",
    "calibration_target_shares_key",
    "check_state_dict",
    "latest_checkpoint",
    "load_car_networks",
    "load_network_checkpoint",
    "raise_if_non_finite",
    "retain_freed_memory",
    "run_stage",
    "stage_finished",
]
