"""A baseline that refines CAR's stage-1 F starts from CAR's finished stage-1 checkpoints (the demos)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["copy_stage1_checkpoints"]


def copy_stage1_checkpoints(source_run: Path, run_dir: Path) -> list[Path]:
    """Copy ``source_run``'s ``checkpoints/stage1_*.pt`` into ``run_dir/checkpoints``, keeping any already there.

    Returns:
        The stage-1 checkpoints of ``run_dir`` that come from ``source_run``.
    """
    target = run_dir / "checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for checkpoint in sorted((source_run / "checkpoints").glob("stage1_*.pt")):
        destination = target / checkpoint.name
        if not destination.exists():
            shutil.copy2(checkpoint, destination)
        copied.append(destination)
    return copied
