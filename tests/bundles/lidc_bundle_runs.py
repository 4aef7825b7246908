"""Run the LIDC bundle as users do (``python -m monai.bundle run ...`` in a subprocess) with tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = REPO_ROOT / "bundles" / "lidc"

#: a few iterations of each stage at batch 2, validation and checkpoints every 3 iterations
TINY = {
    "stage1_iterations": 6,
    "stage2_iterations": 6,
    "batch_size": 2,
    "num_samples": 4,
    "val_interval": 3,
    "val_subset_size": 8,
    "checkpoint_interval": 3,
    "log_every": 1,
    "progress": "False",
}


def config_files(*names: str) -> str:
    return "[" + ",".join(f"'{BUNDLE / name}'" for name in names) + "]"


def bundle_command(run_id: str, configs: Sequence[str], **overrides) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_files(*configs)]
    for key, value in {**TINY, **overrides}.items():
        command += [f"--{key}", str(value)]
    return command


def bundle_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HOME"] = str(home)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_bundle(run_id: str, configs: Sequence[str], home: Path, timeout: float = 600, **overrides):
    """Run to completion; return the CompletedProcess (stdout and stderr merged into ``.stdout``)."""
    return subprocess.run(
        bundle_command(run_id, configs, **overrides),
        env=bundle_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
