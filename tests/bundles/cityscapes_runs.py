"""Run the Cityscapes bundle as users do (``python -m monai.bundle run ...`` in a subprocess) with tiny settings,
on a synthetic Cityscapes tree made and preprocessed with the repository's own CLIs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lidc_bundle_runs import REPO_ROOT, bundle_env

BUNDLE = REPO_ROOT / "bundles" / "cityscapes"

#: two iterations of each stage at batch 2 and M=3, validation and checkpoints every 2 iterations
TINY = {
    "stage1_iterations": 2,
    "stage2_iterations": 2,
    "batch_size": 2,
    "num_samples": 3,
    "val_interval": 2,
    "val_subset_size": 2,
    "val_num_samples": 4,
    "checkpoint_interval": 2,
    "log_every": 1,
    "progress": "False",
}

#: evaluation on 4 test images with 4 samples
TINY_EVAL = {"eval_max_cases": 4, "eval_ged_counts": "[4]", "eval_calibration_count": 4}


def make_synthetic_dataset(root: Path, size: Sequence[int] = (64, 128), images_per_city: int = 2) -> Path:
    """Write a synthetic tree in the official layout with a black box, preprocess it at ``size``; return OUT."""
    raw, pred, out = root / "raw", root / "pred", root / "preprocessed"
    h, w = (str(s) for s in size)
    for command in (
        [sys.executable, "-m", "preprocessing.synthetic_cityscapes", "--output-dir", str(raw), "--blackbox-dir",
         str(pred), "--images-per-city", str(images_per_city), "--size", h, w],
        [sys.executable, "-m", "preprocessing.cityscapes", "--root", str(raw), "--output-dir", str(out),
         "--blackbox-dir", str(pred), "--size", h, w, "--no-progress"],
    ):  # fmt: skip
        subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    return out


def config_files(*names: str) -> str:
    return "[" + ",".join(f"'{BUNDLE / name}'" for name in names) + "]"


def run_cityscapes_bundle(run_id: str, configs: Sequence[str], home: Path, timeout: float = 600, **overrides):
    """Run to completion; return the CompletedProcess (stdout and stderr merged into ``.stdout``)."""
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_files(*configs)]
    for key, value in {**TINY, **overrides}.items():
        command += [f"--{key}", str(value)]
    return subprocess.run(
        command,
        env=bundle_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
