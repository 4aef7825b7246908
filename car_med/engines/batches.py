"""Batch preparation for MONAI trainers whose target is not the batch's ``label``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys

__all__ = ["F_TARGETS", "PrepareBatchWithTarget", "calibration_target_batch", "calibration_target_shares_key"]

F_TARGETS = {"one_reader": CommonKeys.LABEL, "readers_mean": "label_shares"}
"""Stage-1 targets of F: one reader's mask drawn per step (the paper), or the readers' class shares."""


class PrepareBatchWithTarget(PrepareBatch):
    """``(batch[image_key], batch[target_key])`` on the device, for ``SupervisedTrainer(prepare_batch=...)``.

    Args:
        target_key: the batch key of the loss target, e.g. ``"label_shares"`` written by
            :class:`~car_med.data.ReaderSharesd`.
        image_key: the batch key of the network input.
    """

    def __init__(self, target_key: str = CommonKeys.LABEL, image_key: str = CommonKeys.IMAGE) -> None:
        self.target_key = target_key
        self.image_key = image_key

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in (self.image_key, self.target_key) if key not in batchdata]
        if missing:
            raise KeyError(
                f"the batch has no {missing} (keys: {sorted(batchdata)}); a target key such as 'label_shares' must "
                "be written by the training transform (lidc_transforms(..., shares_key='label_shares'))."
            )
        return tuple(  # type: ignore[return-value]
            batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)
            for key in (self.image_key, self.target_key)
        )


def _check_f_target(f_target: str) -> str:
    if f_target not in F_TARGETS:
        raise ValueError(f"f_target must be one of {sorted(F_TARGETS)}, got {f_target!r}.")
    return f_target


def calibration_target_batch(f_target: str) -> PrepareBatchWithTarget:
    """The stage-1 batch preparation for the bundle key ``f_target`` (``"one_reader"`` or ``"readers_mean"``)."""
    return PrepareBatchWithTarget(F_TARGETS[_check_f_target(f_target)])


def calibration_target_shares_key(f_target: str) -> str | None:
    """The key the training transform must write the readers' shares under for ``f_target``; ``None`` for one reader."""
    return None if _check_f_target(f_target) == "one_reader" else str(F_TARGETS[f_target])
