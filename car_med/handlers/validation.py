"""Validation during CAR's stage 2: GED and HM-IoU of G's samples on a fixed subset, the best checkpoint kept."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from car_med.evaluation.references import REFERENCE_ROWS, ReferenceRows, flatten_references
from car_med.evaluation.sample_metrics import SampleMetricSuite, evaluate_samples
from car_med.files import atomic_write
from car_med.sampling import CARSampler

__all__ = ["SampleValidation"]

logger = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # a kill mid-write must never leave a truncated "best" checkpoint behind
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


class SampleValidation:
    """Every ``interval`` iterations (and at the end), score G's samples on a fixed validation subset.

    The metrics (GED and HM-IoU with ``num_samples`` samples, sample diversity, F's ECE) come from
    :class:`~car_med.evaluation.SampleMetricSuite` with per-case seeded noise, so they are the numbers a
    one-process ``evaluate.json`` run gives for the same checkpoint and subset. Under DDP each rank samples
    its shard of the loader and MONAI's metric buffers gather all cases. Only rank 0 writes: the metrics go
    to ``engine.state.metrics`` (as ``val_<name>``), to the MLflow run of ``mlflow_handler`` with the
    iteration as step, and to ``history_file``; a sample montage PNG is logged as an artifact; and when
    ``key_metric`` improves, ``save_dict`` is written to ``best_checkpoint``.

    The handler is stateful (``state_dict``/``load_state_dict``): put it in the checkpoint's save dict and
    a resumed run remembers the best score so far.

    Args:
        calibration_network: F.
        refinement_network: G.
        data_loader: the fixed validation subset; items need ``case_index`` (see ``with_case_index``).
        interval: iterations between validations.
        num_samples: samples per case (GED and HM-IoU counts); HM-IoU needs a multiple of the reader count.
        seed: the noise seed of every validation (fixed, so scores differ only because the model did).
        device: where to sample.
        max_batch: folded rows per G pass in the sampler.
        noise_std: G's noise scale.
        key_metric: the name (without ``val_``) that picks the best checkpoint; lower is better for
            ``ged*`` and ``diversity*`` is not a quality score, so use ``ged<n>`` or ``hm_iou<n>``.
        save_dict: objects whose ``state_dict`` make the best checkpoint.
        best_checkpoint: its path (a fixed name, written atomically).
        mlflow_handler: MONAI ``MLFlowHandler`` whose run receives the metrics and montages.
        montage_dir: where montage PNGs go; ``None`` for none.
        montage_cases: cases per montage.
        history_file: JSON file with every validation's metrics and the best so far.
        reference_rows: the reference rows scored on the same cases at the first validation.
        min_component_size: the sampler's (:class:`~car_med.sampling.CARSampler`): the samples' foreground
            components under this many pixels become background; 0 keeps G's plain argmax.
    """

    def __init__(
        self,
        calibration_network: torch.nn.Module,
        refinement_network: torch.nn.Module,
        data_loader: Any,
        interval: int,
        num_samples: int = 16,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_batch: int = 8,
        noise_std: float = 1.0,
        key_metric: str = "ged16",
        save_dict: Mapping[str, Any] | None = None,
        best_checkpoint: str | os.PathLike | None = None,
        mlflow_handler: Any = None,
        montage_dir: str | os.PathLike | None = None,
        montage_cases: int = 4,
        history_file: str | os.PathLike | None = None,
        reference_rows: Sequence[str] = REFERENCE_ROWS,
        min_component_size: int = 0,
    ) -> None:
        if interval < 1:
            raise ValueError(f"validation interval must be >= 1 iteration, got {interval}.")
        self.sampler = CARSampler(
            calibration_network,
            refinement_network,
            num_samples,
            max_batch=max_batch,
            noise_std=noise_std,
            min_component_size=min_component_size,
        )
        self.suite = SampleMetricSuite(
            ged_counts=(num_samples,), hm_iou_counts=(num_samples,), diversity_count=num_samples
        )
        self.references = ReferenceRows(self.suite, reference_rows) if reference_rows else None
        self.reference_metrics: dict[str, dict[str, float]] = {}
        if key_metric not in self.suite.names:
            raise ValueError(f"key_metric must be one of {self.suite.names}, got {key_metric!r}.")
        self.data_loader = data_loader
        self.interval = interval
        self.seed = seed
        self.device = device
        self.key_metric = key_metric
        self.higher_is_better = key_metric.startswith("hm_iou")
        self.save_dict = dict(save_dict or {})
        self.best_checkpoint = None if best_checkpoint is None else Path(best_checkpoint)
        self.mlflow_handler = mlflow_handler
        self.montage_dir = None if montage_dir is None else Path(montage_dir)
        self.montage_cases = montage_cases
        self.history_file = None if history_file is None else Path(history_file)
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.history: list[dict[str, float]] = []

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_iteration": self.best_iteration, "history": self.history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.best_iteration = state["best_iteration"]
        self.history = list(state["history"])

    # ------------------------------------------------------------------------------------------- events
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._at_end)

    def _at_end(self, engine: Engine) -> None:
        done = {entry["iteration"] for entry in self.history}
        if engine.state.iteration not in done:
            self(engine)

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.higher_is_better else value < self.best

    def __call__(self, engine: Engine) -> dict[str, float]:
        iteration = engine.state.iteration
        kept: list = []

        def keep(batch, drawn) -> None:
            if self.montage_dir is None or len(kept) >= self.montage_cases:
                return
            for i in range(min(self.montage_cases - len(kept), drawn.samples.shape[0])):
                kept.append(
                    (batch["image"][i], batch["label"][i], drawn.calibration[i], drawn.mean[i], drawn.samples[i])
                )

        metrics = evaluate_samples(
            self.sampler,
            self.data_loader,
            self.suite,
            self.seed,
            self.device,
            on_batch=keep,
            references=self.references,
        )
        engine.state.metrics.update({f"val_{k}": v for k, v in metrics.items()})
        self.reference_metrics = self.references.aggregate() if self.references is not None else {}
        engine.state.metrics.update({f"val_{k}": v for k, v in flatten_references(self.reference_metrics).items()})
        value = metrics[self.key_metric]
        improved = self._improved(value)
        if improved:
            self.best, self.best_iteration = value, iteration
        entry = {"iteration": iteration, **metrics}
        self.history.append(entry)
        logger.info(
            "validation at iteration %d: %s (best %s %.4f at %d)",
            iteration,
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            self.key_metric,
            self.best,
            self.best_iteration,
        )
        if self.reference_metrics:
            logger.info(
                "  reference rows on the same cases: %s",
                "; ".join(
                    f"{row} " + ", ".join(f"{k}={v:.4f}" for k, v in values.items() if k in metrics)
                    for row, values in self.reference_metrics.items()
                ),
            )
        if _rank() == 0:
            self._write(engine, entry, improved, kept)
        return metrics

    def _write(self, engine: Engine, entry: dict, improved: bool, kept: Sequence) -> None:
        iteration = entry["iteration"]
        if improved and self.best_checkpoint is not None:
            self.best_checkpoint.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.state_dict() for k, v in self.save_dict.items()}
            state["validation"] = {"iteration": iteration, "metric": self.key_metric, "value": self.best}
            _atomic_torch_save(state, self.best_checkpoint)
        if self.history_file is not None:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            summary = {
                "key_metric": self.key_metric,
                "best": self.best,
                "best_iteration": self.best_iteration,
                "last": entry,
                "references": self.reference_metrics,
                "history": self.history,
            }
            self.history_file.write_text(json.dumps(summary, indent=1))
        montage = None
        if self.montage_dir is not None and kept:
            from car_med.visualize.lidc import plot_lidc_montage

            images, labels, calibration, mean, samples = zip(*kept)
            montage = plot_lidc_montage(
                images, labels, calibration, mean, samples, self.montage_dir / f"validation_{iteration:07d}.png"
            )
        handler = self.mlflow_handler
        run = getattr(handler, "cur_run", None)
        if run is not None:
            client, run_id = handler.client, run.info.run_id
            for key, value in entry.items():
                if key != "iteration":
                    client.log_metric(run_id, f"val_{key}", value, step=iteration)
            for key, value in flatten_references(self.reference_metrics).items():
                client.log_metric(run_id, f"val_{key}", value, step=iteration)
            if montage is not None:
                client.log_artifact(run_id, str(montage), artifact_path="validation_montages")
