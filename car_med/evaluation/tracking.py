"""One MLflow run per evaluation: its parameters, metrics and output files, shared by the LIDC and Cityscapes suites."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

__all__ = ["log_evaluation_run"]


def log_evaluation_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    params: dict,
    metrics: dict[str, float],
    files: Iterable[str | os.PathLike],
) -> str:
    """Log a finished evaluation as a new MLflow run (the experiment is created if missing); returns its id.

    A NaN metric (e.g. a class offset with no pixel to measure it on) is left out rather than logged as NaN.
    The run is marked terminated even if logging fails half-way.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    try:
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for key, value in metrics.items():
            if not math.isnan(value):
                client.log_metric(run_id, key, value)
        for file in files:
            client.log_artifact(run_id, str(file))
    finally:
        client.set_terminated(run_id)
    return run_id
