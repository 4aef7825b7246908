"""End of LIDC training: hand the best stage-2 weights to the MLflow model registry, once per trained run."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from car_med.engines.checkpoints import load_car_networks
from car_med.networks.factory import spec_to_target_config

__all__ = ["REGISTRATION_FILE", "register_trained_model"]

logger = logging.getLogger(__name__)

REGISTRATION_FILE = "registered_model.json"


def _training_run_id(mlflow_handler: Any) -> str | None:
    """The run the training logged to; found by name when this process did not train (a finished rerun)."""
    if mlflow_handler is None:
        return None
    if getattr(mlflow_handler, "cur_run", None) is not None:
        return mlflow_handler.cur_run.info.run_id
    client = mlflow_handler.client
    experiment = client.get_experiment_by_name(mlflow_handler.experiment_name)
    if experiment is None or mlflow_handler.run_name is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.run_name = '{mlflow_handler.run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _dataset_source(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    from car_med.evaluation.protocol import dataset_card

    try:
        return dataset_card(Path(dataset_dir) / "datalist.json")
    except (OSError, ValueError) as err:
        return {"dataset_dir": str(dataset_dir), "error": str(err)}


def register_trained_model(
    calibration_network: torch.nn.Module,
    refinement_network: torch.nn.Module,
    calibration_network_spec: Mapping[str, Any],
    refinement_network_spec: Mapping[str, Any],
    best_checkpoint: str | os.PathLike | None,
    final_checkpoint: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    model_name: str,
    tracking_uri: str | None,
    mlflow_handler: Any = None,
    hu_window: Sequence[float] = (-1024.0, 400.0),
    noise_std: float = 1.0,
    dataset_dir: str | os.PathLike | None = None,
    min_component_size: int = 0,
) -> dict[str, Any]:
    """Register F and G of the best validation checkpoint (else the last one) under ``model_name``.

    The registration is recorded in ``<output_dir>/registered_model.json``; a rerun of a finished training
    finds it and registers nothing new. The model is logged into the training's MLflow run, so the
    registry's version links to the run's parameters, losses and validation curves.

    Returns:
        The record written: model name, version, model URI, run id, weights file and validation score.
    """
    from car_med.registry import register_car_model

    record_path = Path(output_dir) / REGISTRATION_FILE
    source = next((Path(p) for p in (best_checkpoint, final_checkpoint) if p and Path(p).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"no stage-2 checkpoint to register: neither {best_checkpoint} nor {final_checkpoint}.")
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("weights") == str(source) and record.get("weights_mtime_ns") == source.stat().st_mtime_ns:
            logger.info("%s version %s already holds %s: not registered again.", model_name, record["version"], source)
            return record
    load_car_networks(calibration_network, refinement_network, source)
    validation = torch.load(source, map_location="cpu", weights_only=True).get("validation")
    run_id = _training_run_id(mlflow_handler)
    staging = Path(output_dir) / "registry_staging"
    staging.mkdir(parents=True, exist_ok=True)
    metadata = {"weights": source.name, "validation": validation}
    if dataset_dir is not None:
        metadata["dataset"] = _dataset_source(dataset_dir)
    result = register_car_model(
        calibration_network,
        refinement_network,
        spec_to_target_config(calibration_network_spec),
        spec_to_target_config(refinement_network_spec),
        model_name=model_name,
        tracking_uri=tracking_uri,
        run_id=run_id,
        hu_window=tuple(float(v) for v in hu_window),
        noise_dim=int(refinement_network_spec["noise_dim"]),
        noise_std=noise_std,
        min_component_size=min_component_size,
        extra_metadata=metadata,
        work_dir=str(staging),
    )
    record = {
        "model_name": model_name,
        "version": int(getattr(result, "registered_model_version", None) or result.version),
        "model_uri": getattr(result, "model_uri", None),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "weights": str(source),
        "weights_mtime_ns": source.stat().st_mtime_ns,
        "validation": validation,
    }
    record_path.write_text(json.dumps(record, indent=1))
    logger.info("registered %s version %s from %s", model_name, record["version"], source)
    return record
