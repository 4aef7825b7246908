"""Run one training stage so that a rerun resumes it, and a finished stage is loaded instead of retrained."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

__all__ = ["run_stage", "stage_finished"]

logger = logging.getLogger(__name__)


def stage_finished(checkpoint_path: str | None, iterations: int) -> bool:
    """Whether the checkpoint (the newest of a stage, or ``None``) records ``iterations`` finished iterations."""
    if checkpoint_path is None:
        return False
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    trainer = checkpoint.get("trainer") if isinstance(checkpoint, dict) else None
    if not isinstance(trainer, dict) or "iteration" not in trainer:
        raise ValueError(f"{checkpoint_path}: no 'trainer' state to tell how far the stage got.")
    return int(trainer["iteration"]) >= iterations


def run_stage(trainer: Engine, checkpoint_handlers: Sequence[Any], finished: bool, name: str) -> None:
    """Attach the stage's checkpoint handlers and run it; a finished stage only loads its checkpoint.

    Loading matters: a later stage (CAR's stage 2 needs stage 1's F) must start from the trained weights
    even when the earlier stage finished in a previous process. Not running a finished stage also keeps
    its handlers quiet, e.g. no new, empty MLflow run.
    """
    loader = getattr(trainer, "data_loader", None)
    if not finished and loader is not None and hasattr(loader, "__len__") and len(loader) == 0:
        dataset = getattr(loader, "dataset", None)
        items = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else "?"
        raise ValueError(
            f"{name}: the training loader yields no batch ({items} items, batch_size={loader.batch_size}, "
            "drop_last=True, split over all ranks); lower batch_size or add training data."
        )
    loaders = [h for h in checkpoint_handlers if isinstance(h, CheckpointLoader)]
    if finished:
        for loader in loaders:
            loader(trainer)
        logger.info(
            "%s finished in an earlier run: weights loaded from %s, not retrained.",
            name,
            ", ".join(str(getattr(h, "load_path", "?")) for h in loaders),
        )
        return
    for handler in checkpoint_handlers:
        handler.attach(trainer)
    trainer.run()
