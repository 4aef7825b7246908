"""Table-1 evaluation of a CAR model on an LIDC split: metrics.json with its protocol card, a per-case CSV,
F's reliability diagram, a sample montage, and the same numbers in MLflow."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset

from car_med.data.lidc import DEFAULT_HU_WINDOW, lidc_transforms, load_lidc_datalist
from car_med.engines.checkpoints import load_car_networks
from car_med.evaluation.protocol import METRIC_DEFINITIONS, dataset_card
from car_med.evaluation.sample_metrics import SampleMetricSuite, evaluate_samples, with_case_index
from car_med.evaluation.tracking import log_evaluation_run
from car_med.metrics import plot_reliability_diagram
from car_med.sampling import CARSampler

__all__ = ["CASE_FIELDS", "evaluate_lidc"]

logger = logging.getLogger(__name__)

CASE_FIELDS = ("case_index", "patient_id", "series_uid", "nodule_id", "slice_z", "num_annotators")


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def evaluate_lidc(
    calibration_network: torch.nn.Module,
    refinement_network: torch.nn.Module,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "test",
    checkpoint: str | os.PathLike | None = None,
    ged_counts: Sequence[int] = (16, 50, 100),
    hm_iou_counts: Sequence[int] = (16, 32),
    diversity_count: int = 16,
    ece_bins: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    max_cases: int | None = None,
    max_batch: int = 32,
    noise_std: float = 1.0,
    roi_size: Sequence[int] = (128, 128),
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    num_workers: int = 0,
    model_label: str = "CAR",
    montage_cases: int = 8,
    tracking_uri: str | None = None,
    experiment_name: str = "car_lidc",
    run_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score G's samples and F's calibration on one split and write the report files.

    Writes into ``output_dir``: ``metrics.json`` (the numbers, N, the checkpoint and the protocol card:
    dataset source, split seed and counts, sample counts, noise seed and every metric's definition, including
    the empty-empty rule), ``per_case.csv`` (one row per case with its ids and per-case metrics),
    ``reliability.png`` (F's reliability diagram) and ``montage.png`` (the first cases' readers, F, Gbar and
    samples). With ``tracking_uri`` the metrics and files also go to a new MLflow run.

    Args:
        calibration_network: F (weights from ``checkpoint`` if given).
        refinement_network: G (weights from ``checkpoint`` if given).
        datalist: the dataset's ``datalist.json``.
        output_dir: where the report goes.
        split: ``"test"`` (default), ``"validation"`` or ``"training"``.
        checkpoint: a stage-2 checkpoint holding ``calibration_network`` and ``refinement_network``.
        ged_counts: GED sample counts (16, 50, 100 as in Table 1).
        hm_iou_counts: HM-IoU sample counts (multiples of the 4 reader slots).
        diversity_count: samples for the sample diversity.
        ece_bins: bins of F's ECE.
        seed: noise seed (per case, see ``car_med.evaluation.case_generator``).
        device: where to run.
        batch_size: cases per batch.
        max_cases: only the split's first cases (e.g. the validation subset); ``None`` for all.
        max_batch: folded rows per G pass.
        noise_std: G's noise scale.
        roi_size: centre crop, as in training.
        hu_window: HU window, as in training.
        num_workers: data loader workers.
        model_label: the model's name in the report (e.g. ``"CAR"``, ``"cGAN+L_ce"``).
        montage_cases: cases in ``montage.png``.
        tracking_uri: MLflow tracking URI, or ``None`` to log nothing.
        experiment_name: MLflow experiment.
        run_name: MLflow run name (default ``evaluate-<split>``).
        progress: show a progress bar.

    Returns:
        The content of ``metrics.json``.
    """
    from car_med.visualize.lidc import plot_lidc_montage

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        load_car_networks(calibration_network, refinement_network, checkpoint, map_location=device)
    items = with_case_index(load_lidc_datalist(datalist, split))
    if max_cases is not None:
        items = items[:max_cases]
    if not items:
        raise ValueError(f"{datalist}: split {split!r} has no cases to evaluate.")
    loader = DataLoader(
        Dataset(items, lidc_transforms("eval", roi_size=roi_size, hu_window=hu_window)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    sampler = CARSampler(calibration_network, refinement_network, max_batch=max_batch, noise_std=noise_std)
    suite = SampleMetricSuite(ged_counts, hm_iou_counts, diversity_count, ece_bins)
    rows: list[dict[str, Any]] = []
    kept: list = []

    def collect(batch, drawn) -> None:
        for i in range(drawn.samples.shape[0]):
            rows.append({field: _scalar(batch[field][i]) for field in CASE_FIELDS if field in batch})
            if len(kept) < montage_cases:
                kept.append(
                    (batch["image"][i], batch["label"][i], drawn.calibration[i], drawn.mean[i], drawn.samples[i])
                )

    metrics = evaluate_samples(sampler, loader, suite, seed, device, on_batch=collect, progress=progress)
    per_case = suite.per_case()
    with open(out / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CASE_FIELDS, *per_case])
        writer.writeheader()
        for k, row in enumerate(rows):
            writer.writerow({**row, **{name: f"{values[k]:.6f}" for name, values in per_case.items()}})
    reliability = suite.reliability()
    plot_reliability_diagram(reliability, out / "reliability.png", title=f"F on LIDC {split}")
    images, labels, calibration, mean, samples = zip(*kept)
    titles = [f"{r.get('patient_id', '')} z={r.get('slice_z', '')}" for r in rows[: len(kept)]]
    plot_lidc_montage(images, labels, calibration, mean, samples, out / "montage.png", titles=titles)

    report = {
        "model": model_label,
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "split": split,
        "num_cases": len(rows),
        "metrics": metrics,
        "protocol": {
            "dataset": dataset_card(datalist),
            "evaluated_cases": "all" if max_cases is None else f"first {max_cases}",
            "sample_counts": {"ged": list(ged_counts), "hm_iou": list(hm_iou_counts), "diversity": diversity_count},
            "seed": seed,
            "roi_size": list(roi_size),
            "hu_window": list(hu_window),
            "metric_definitions": METRIC_DEFINITIONS,
        },
        "reliability": {
            "ece": reliability.ece,
            "bin_edges": reliability.bin_edges.tolist(),
            "confidence": reliability.confidence.tolist(),
            "accuracy": reliability.accuracy.tolist(),
            "count": reliability.count.tolist(),
        },
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    logger.info("%s on %s (%d cases): %s", model_label, split, len(rows), metrics)
    if tracking_uri:
        params = {"split": split, "num_cases": len(rows), "seed": seed, "model": model_label}
        files = [out / name for name in ("metrics.json", "per_case.csv", "reliability.png", "montage.png")]
        report["mlflow_run_id"] = log_evaluation_run(
            tracking_uri, experiment_name, run_name or f"evaluate-{split}", params, metrics, files
        )
    return report
