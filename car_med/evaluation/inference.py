"""Per-case CAR outputs on an LIDC split, for review and export: samples, Gbar, F's probabilities, entropy."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor

from car_med.data.lidc import DEFAULT_HU_WINDOW, lidc_transforms, load_lidc_datalist
from car_med.evaluation.lidc import CASE_FIELDS
from car_med.evaluation.sample_metrics import sample_cases
from car_med.evaluation.start import start_evaluation
from car_med.files import atomic_write
from car_med.sampling import SamplerOptions

__all__ = ["PREDICTION_KEYS", "write_case_predictions"]

PREDICTION_KEYS = ("samples", "mean", "calibration", "entropy", "image", "affine")
"""Arrays in each case's ``.npz``: ``samples`` uint8 ``(M, H, W)``; ``mean`` (Gbar) and ``calibration`` (F)
float32 ``(C, H, W)``; ``entropy`` H(F(x)) in nats ``(H, W)``; ``image`` in [0, 1] ``(H, W)``; ``affine`` the
crop's 4x4 scanner-frame (RAS) affine, so export can put the pixels back on the CT."""


def _case_name(case_index: int) -> str:
    return f"case_{case_index:06d}.npz"


def write_case_predictions(
    calibration_network: torch.nn.Module,
    refinement_network: torch.nn.Module,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "test",
    checkpoint: str | os.PathLike | None = None,
    num_samples: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_cases: int | None = None,
    max_batch: int = 32,
    noise_std: float = 1.0,
    roi_size: Sequence[int] = (128, 128),
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    progress: bool = True,
    min_component_size: int = 0,
) -> str:
    """Write one ``case_<index>.npz`` per case (see :data:`PREDICTION_KEYS`) and ``manifest.csv``.

    Each case's noise comes from its own seeded generator (as in evaluation), so rerunning after a kill
    skips the cases already written (each file is written atomically) and gives the same files.
    ``min_component_size`` is the sampler's (:class:`~car_med.sampling.CARSampler`); 0 keeps G's plain argmax.

    Returns:
        The path of ``manifest.csv`` (one row per case: its ids and its ``.npz`` file).
    """
    out, items, sampler = start_evaluation(
        calibration_network,
        refinement_network,
        datalist=datalist,
        split=split,
        read_split=load_lidc_datalist,
        output_dir=output_dir,
        checkpoint=checkpoint,
        device=device,
        max_cases=max_cases,
        sampler_options=SamplerOptions(
            num_samples=num_samples, max_batch=max_batch, noise_std=noise_std, min_component_size=min_component_size
        ),
    )
    todo = [item for item in items if not (out / _case_name(item["case_index"])).is_file()]
    if todo:
        loader = DataLoader(
            Dataset(todo, lidc_transforms("eval", roi_size=roi_size, hu_window=hu_window)), batch_size=1
        )
        for batch, drawn in sample_cases(sampler, loader, num_samples, seed, device, progress=progress):
            image = batch["image"]
            affine = image.affine[0] if isinstance(image, MetaTensor) else torch.eye(4)
            arrays: dict[str, Any] = {
                "samples": drawn.samples[0].cpu().numpy().astype(np.uint8),
                "mean": drawn.mean[0].cpu().numpy().astype(np.float32),
                "calibration": drawn.calibration[0].cpu().numpy().astype(np.float32),
                "entropy": drawn.entropy[0].cpu().numpy().astype(np.float32),
                "image": np.asarray(image[0, 0], dtype=np.float32),
                "affine": np.asarray(affine, dtype=np.float64),
            }
            target = out / _case_name(int(batch["case_index"][0]))
            with atomic_write(target, suffix=".tmp.npz") as tmp:  # np.savez appends .npz to any other name
                np.savez_compressed(tmp, **arrays)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CASE_FIELDS, "file"])
        writer.writeheader()
        for item in items:
            row = {field: item.get(field, "") for field in CASE_FIELDS}
            writer.writerow({**row, "file": _case_name(item["case_index"])})
    return str(manifest)
