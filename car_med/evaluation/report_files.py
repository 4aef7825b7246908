"""The report files every evaluation writes: ``per_case.csv``, the reliability block and ``metrics.json``."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from car_med.evaluation.tracking import log_evaluation_run
from car_med.files import atomic_write_bytes
from car_med.metrics.calibration import ReliabilityData

__all__ = ["case_row", "reliability_record", "report_head", "write_per_case_csv", "write_report"]

logger = logging.getLogger("car_med.evaluation")


def report_head(
    model_label: str, checkpoint: str | os.PathLike | None, split: str, num_cases: int, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """The first keys of every ``metrics.json``: the model, its checkpoint (absolute), the split, N, the metrics."""
    return {
        "model": model_label,
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "split": split,
        "num_cases": num_cases,
        "metrics": metrics,
    }


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def case_row(batch: Mapping[str, Any], index: int, fields: Sequence[str]) -> dict[str, Any]:
    """Item ``index`` of a collated batch as a CSV row of its identifying ``fields`` (NaN becomes empty)."""
    return {field: _scalar(batch[field][index]) for field in fields if field in batch}


def write_per_case_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str], per_case: Mapping[str, Sequence[float]]
) -> None:
    """One row per case: its ``fields``, then every per-case metric with 6 decimals (NaN becomes empty)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*fields, *per_case])
        writer.writeheader()
        for k, row in enumerate(rows):
            values = {name: "" if math.isnan(v[k]) else f"{v[k]:.6f}" for name, v in per_case.items()}
            writer.writerow({**row, **values})


def reliability_record(reliability: ReliabilityData) -> dict[str, Any]:
    """F's reliability diagram as JSON: ECE, bin edges, confidence, accuracy and count per bin."""
    return {
        "ece": reliability.ece,
        "bin_edges": reliability.bin_edges.tolist(),
        "confidence": reliability.confidence.tolist(),
        "accuracy": reliability.accuracy.tolist(),
        "count": reliability.count.tolist(),
    }


def write_report(
    out: Path,
    report: dict[str, Any],
    description: str,
    tracking_uri: str | None,
    experiment_name: str,
    run_name: str | None,
    params: Mapping[str, Any],
    logged_metrics: Mapping[str, float],
    files: Sequence[str],
    log: logging.Logger = logger,
) -> dict[str, Any]:
    """Write ``metrics.json``, log one line, and with ``tracking_uri`` log the run to MLflow.

    Args:
        out: the evaluation folder.
        report: the content of ``metrics.json``; gains ``mlflow_run_id`` when logged.
        description: what was evaluated, e.g. ``"CAR on test (47 cases)"``, for the log line.
        tracking_uri, experiment_name, run_name: MLflow; ``run_name`` defaults to ``evaluate-<split>``.
        params: MLflow params besides ``split``, ``num_cases``, ``seed`` and ``model``.
        logged_metrics: MLflow metrics.
        files: names of files in ``out`` to log as artifacts.
        log: the logger of the calling evaluation.

    Returns:
        ``report``.
    """
    atomic_write_bytes(out / "metrics.json", json.dumps(report, indent=1).encode())
    log.info("%s: %s", description, report["metrics"])
    if tracking_uri:
        split = report["split"]
        base = {"split": split, "num_cases": report["num_cases"], "seed": report["protocol"]["seed"]}
        report["mlflow_run_id"] = log_evaluation_run(
            tracking_uri,
            experiment_name,
            run_name or f"evaluate-{split}",
            {**base, "model": report["model"], **params},
            dict(logged_metrics),
            [out / name for name in files],
        )
    return report
