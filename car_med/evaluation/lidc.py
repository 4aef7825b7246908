"""Table-1 evaluation of a CAR model on an LIDC split: metrics.json with its protocol card and the reference
rows, a per-case CSV, F's reliability diagram, the presence-calibration plot, the hypotheses' reliability
diagram, a sample montage, and the same numbers in MLflow."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset

from car_med.data.lidc import DEFAULT_HU_WINDOW, lidc_transforms, load_lidc_datalist
from car_med.evaluation.hypotheses import HYPOTHESIS_REFERENCE_ROWS, NoduleHypotheses
from car_med.evaluation.protocol import METRIC_DEFINITIONS, REFERENCE_DEFINITIONS, dataset_card
from car_med.evaluation.references import REFERENCE_LABELS, REFERENCE_ROWS, ReferenceRows, flatten_references
from car_med.evaluation.report_files import (
    case_row,
    reliability_record,
    report_head,
    write_per_case_csv,
    write_report,
)
from car_med.evaluation.sample_metrics import SampleMetricSuite, evaluate_samples, sample_cases
from car_med.evaluation.start import DEFAULT_EVALUATION_SAMPLER, start_evaluation
from car_med.evaluation.volumes import NOISE_MODES, NoduleVolumes, with_nodule_noise
from car_med.hypotheses import DEFAULT_MIN_IOU
from car_med.metrics import plot_reliability_diagram
from car_med.metrics.hypotheses import DEFAULT_COVERAGE_PROBABILITY, DEFAULT_HYPOTHESIS_BINS
from car_med.metrics.presence import DEFAULT_MIN_AREA, DEFAULT_SPECKLE_SIZE, plot_presence_reliability
from car_med.sampling import CARSampler, SamplerOptions

__all__ = [
    "CASE_FIELDS",
    "LidcEvaluationSettings",
    "ScoredSplit",
    "draw_nodule_volumes",
    "evaluate_lidc",
    "score_split",
    "write_lidc_report_files",
]

logger = logging.getLogger(__name__)

CASE_FIELDS = ("case_index", "patient_id", "series_uid", "nodule_id", "slice_z", "num_annotators")
NODULE_FIELDS = ("patient_id", "series_uid", "nodule_id", "num_slices")
REPORT_FILES = (
    "metrics.json",
    "per_case.csv",
    "per_nodule.csv",
    "reliability.png",
    "presence.png",
    "hypotheses_reliability.png",
    "montage.png",
)


@dataclass(frozen=True)
class LidcEvaluationSettings:
    """Everything that decides an LIDC evaluation's numbers; ``metrics.json``'s protocol card records it.

    Sequences given as lists (a bundle's JSON) are kept as tuples. Checked on construction, before any sampling.

    Attributes:
        split: ``"test"`` (default), ``"validation"`` or ``"training"``.
        max_cases: only the split's first cases (e.g. the validation subset); ``None`` for all.
        ged_counts: GED sample counts (16, 50, 100 as in Table 1).
        hm_iou_counts: HM-IoU sample counts (multiples of the 4 reader slots).
        diversity_count: samples for the sample diversity.
        ece_bins: bins of F's ECE.
        seed: noise seed (per case, see ``car_med.evaluation.case_generator``).
        roi_size: centre crop, as in training.
        hu_window: HU window, as in training.
        presence_min_area: maps with fewer foreground pixels count as empty in the presence gap.
        speckle_size: components under this many pixels are speckle.
        noise: the noise of the 3D metrics. ``"nodule"`` (default): the crops of one nodule share their noise
            vectors, so sample m of a nodule is one 3D hypothesis (as ``car_med.predict`` and the export draw
            them); ``"case"``: every crop draws its own (slices of a sample are independent draws). The 2D
            metrics always draw per crop, seeded by its case index (the literature's protocol); with
            ``"nodule"`` the 3D metrics come from a second draw of ``volume_samples`` per crop.
        volume_samples: samples per nodule of the 3D metrics (``volumes`` in ``metrics.json``,
            ``per_nodule.csv``): each nodule's crops stacked into one volume, 3D GED and HM-IoU against the
            readers' stacked masks, and the mean Dice between adjacent slices of a sample and of a reader.
        hypothesis_min_iou: the IoU every two members of a nodule's hypothesis share at least
            (:func:`car_med.hypotheses.group_samples`), and that a reader's volume needs with a hypothesis's
            representative to be assigned to it.
        reference_rows: the rows of :mod:`car_med.evaluation.references` to score (all four by default).
        hypothesis_reference_rows: the reference rows scored as hypotheses, from
            :data:`~car_med.evaluation.hypotheses.HYPOTHESIS_REFERENCE_ROWS` (both by default): the majority vote
            (one hypothesis, p = 1) and the readers' leave-one-out.
    """

    split: str = "test"
    max_cases: int | None = None
    ged_counts: tuple[int, ...] = (16, 50, 100)
    hm_iou_counts: tuple[int, ...] = (16, 32)
    diversity_count: int = 16
    ece_bins: int = 10
    seed: int = 0
    roi_size: tuple[int, ...] = (128, 128)
    hu_window: tuple[float, ...] = DEFAULT_HU_WINDOW
    presence_min_area: int = DEFAULT_MIN_AREA
    speckle_size: int = DEFAULT_SPECKLE_SIZE
    noise: str = "nodule"
    volume_samples: int = 16
    hypothesis_min_iou: float = DEFAULT_MIN_IOU
    reference_rows: tuple[str, ...] = REFERENCE_ROWS
    hypothesis_reference_rows: tuple[str, ...] = HYPOTHESIS_REFERENCE_ROWS

    def __post_init__(self) -> None:
        for name in ("ged_counts", "hm_iou_counts", "roi_size", "hu_window", "reference_rows"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "hypothesis_reference_rows", tuple(self.hypothesis_reference_rows))
        if self.noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {self.noise!r}.")
        max_samples = self.metric_suite().max_samples
        if not 1 <= self.volume_samples <= max_samples:
            raise ValueError(
                f"volume_samples={self.volume_samples} must be between 1 and the {max_samples} samples drawn per "
                "case (the largest GED, HM-IoU or diversity count)."
            )
        self.nodule_hypotheses()  # a bad min_iou or row fails here, not after the whole split was drawn

    def metric_suite(self) -> SampleMetricSuite:
        """A new, empty suite of the 2D metrics."""
        return SampleMetricSuite(
            self.ged_counts,
            self.hm_iou_counts,
            self.diversity_count,
            self.ece_bins,
            presence_min_area=self.presence_min_area,
            speckle_size=self.speckle_size,
        )

    def nodule_hypotheses(self) -> NoduleHypotheses:
        """A new, empty scorer of the nodules' hypotheses."""
        return NoduleHypotheses(min_iou=self.hypothesis_min_iou, rows=self.hypothesis_reference_rows)

    def loader(self, cases: Sequence[dict], *, batch_size: int, num_workers: int) -> DataLoader:
        """The cases as evaluation batches, cropped and windowed as in training, in order."""
        transform = lidc_transforms("eval", roi_size=self.roi_size, hu_window=self.hu_window)
        return DataLoader(Dataset(cases, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def protocol_card(
        self, datalist: str | os.PathLike, sampler_options: SamplerOptions, reference_rows: Sequence[str]
    ) -> dict[str, Any]:
        """``metrics.json``'s ``protocol``: these settings, the dataset's card and every definition used."""
        return {
            "noise": self.noise,
            "volume_samples": self.volume_samples,
            "dataset": dataset_card(datalist),
            "evaluated_cases": "all" if self.max_cases is None else f"first {self.max_cases}",
            "sample_counts": {
                "ged": list(self.ged_counts),
                "hm_iou": list(self.hm_iou_counts),
                "diversity": self.diversity_count,
            },
            "seed": self.seed,
            "roi_size": list(self.roi_size),
            "hu_window": list(self.hu_window),
            "presence_min_area": self.presence_min_area,
            "speckle_size": self.speckle_size,
            "min_component_size": sampler_options.min_component_size,
            "hypothesis_min_iou": self.hypothesis_min_iou,
            "hypothesis_bins": DEFAULT_HYPOTHESIS_BINS,
            "hypothesis_coverage_min_probability": DEFAULT_COVERAGE_PROBABILITY,
            "metric_definitions": METRIC_DEFINITIONS,
            "reference_definitions": {row: REFERENCE_DEFINITIONS[row] for row in reference_rows},
        }


@dataclass
class ScoredSplit:
    """What :func:`score_split` gives: the 2D metrics, one row per case, and the scored suites.

    Attributes:
        metrics: the model's 2D metrics (means over the cases).
        rows: each case's identifying fields (:data:`CASE_FIELDS`), in order.
        suite: the model's metric suite (per-case values, F's reliability, presence).
        references: the reference rows' suites, or ``None`` without rows.
        montage: the first cases' ``(image, readers, F, Gbar, samples)``.
    """

    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    suite: SampleMetricSuite
    references: ReferenceRows | None
    montage: list[tuple]

    def reference_metrics(self) -> dict[str, dict[str, float]]:
        """Each reference row's metrics (empty without rows)."""
        return self.references.aggregate() if self.references is not None else {}

    def per_case(self) -> dict[str, list[float]]:
        """Every per-case metric: the model's, then each row's as ``<row>_<metric>``."""
        return {**self.suite.per_case(), **(self.references.per_case() if self.references is not None else {})}


def _add_volumes(volumes: NoduleVolumes, batch: Mapping[str, Any], samples: torch.Tensor) -> None:
    affines = batch["image"].affine.reshape(-1, 4, 4)
    for i in range(samples.shape[0]):
        volumes.add(case_row(batch, i, CASE_FIELDS), samples[i], torch.as_tensor(batch["label"][i]), affines[i])


def score_split(
    sampler: CARSampler,
    cases: Sequence[dict],
    settings: LidcEvaluationSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    montage_cases: int = 8,
    progress: bool = False,
    volumes: NoduleVolumes | None = None,
) -> ScoredSplit:
    """Draw every crop's samples (its own noise, seeded by its case index) and score them and the reference rows.

    ``volumes``, when given, also gets each crop's samples: the 3D metrics of ``noise="case"``, from this draw.
    """
    suite = settings.metric_suite()
    references = ReferenceRows(suite, settings.reference_rows) if settings.reference_rows else None
    rows: list[dict[str, Any]] = []
    montage: list[tuple] = []

    def collect(batch, drawn) -> None:
        if volumes is not None:
            _add_volumes(volumes, batch, drawn.samples)
        for i in range(drawn.samples.shape[0]):
            rows.append(case_row(batch, i, CASE_FIELDS))
            if len(montage) < montage_cases:
                montage.append(
                    (batch["image"][i], batch["label"][i], drawn.calibration[i], drawn.mean[i], drawn.samples[i])
                )

    loader = settings.loader(cases, batch_size=batch_size, num_workers=num_workers)
    metrics = evaluate_samples(
        sampler, loader, suite, settings.seed, device, on_batch=collect, progress=progress, references=references
    )
    return ScoredSplit(metrics, rows, suite, references, montage)


def draw_nodule_volumes(
    sampler: CARSampler,
    cases: Sequence[dict],
    settings: LidcEvaluationSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = False,
) -> NoduleVolumes:
    """The 3D draw of ``noise="nodule"``: ``volume_samples`` per crop, the crops of a nodule sharing their noise,
    so sample m of a nodule is one 3D hypothesis; each nodule's crops stacked into volumes.

    A second draw, besides :func:`score_split`'s: the 2D metrics keep the literature's protocol (every crop its
    own draw: more independent draws, less variance).
    """
    volumes = NoduleVolumes(settings.volume_samples)
    loader = settings.loader(with_nodule_noise(cases, "nodule"), batch_size=batch_size, num_workers=num_workers)
    for batch, drawn in sample_cases(
        sampler, loader, settings.volume_samples, settings.seed, device, progress=progress
    ):
        _add_volumes(volumes, batch, drawn.samples)
    return volumes


def write_lidc_report_files(
    out: Path,
    scored: ScoredSplit,
    volumes: NoduleVolumes,
    settings: LidcEvaluationSettings,
    *,
    datalist: str | os.PathLike,
    sampler_options: SamplerOptions,
    checkpoint: str | os.PathLike | None,
    model_label: str,
) -> dict[str, Any]:
    """Write the per-case and per-nodule CSVs and the figures, score the hypotheses, and give ``metrics.json``'s
    content (without the MLflow run id): the model's numbers, the reference rows', the volumes' and the card."""
    from car_med.visualize.lidc import plot_lidc_montage

    split = settings.split
    write_per_case_csv(out / "per_case.csv", scored.rows, CASE_FIELDS, scored.per_case())
    per_nodule = volumes.per_nodule()
    hypotheses = settings.nodule_hypotheses()
    hypotheses.add_nodules(per_nodule, volumes.stacks())  # adds each nodule's hypothesis columns to its row
    nodule_metrics = {k: [r[k] for r in per_nodule] for k in per_nodule[0] if k not in NODULE_FIELDS}
    write_per_case_csv(out / "per_nodule.csv", per_nodule, NODULE_FIELDS, nodule_metrics)
    model_hypotheses, row_hypotheses, hypothesis_curves = hypotheses.report(
        model_label, REFERENCE_LABELS, out / "hypotheses_reliability.png", title=f"hypotheses, LIDC {split}"
    )
    # added to the 2D metrics and to the rows, not in place of anything: every earlier number stays as it was
    metrics = {**scored.metrics, **model_hypotheses}
    reference_metrics = scored.reference_metrics()
    for row, values in row_hypotheses.items():
        reference_metrics.setdefault(row, {}).update(values)
    reliability = scored.suite.reliability()
    plot_reliability_diagram(reliability, out / "reliability.png", title=f"F on LIDC {split}")
    presence_curves = {model_label: scored.suite.presence_reliability()}
    if scored.references is not None:
        presence_curves.update(
            {REFERENCE_LABELS[row]: s.presence_reliability() for row, s in scored.references.suites.items()}
        )
    plot_presence_reliability(
        presence_curves,
        out / "presence.png",
        title=f"presence calibration, LIDC {split} (empty: < {settings.presence_min_area} px)",
    )
    images, labels, calibration, mean, samples = zip(*scored.montage)
    titles = [f"{r.get('patient_id', '')} z={r.get('slice_z', '')}" for r in scored.rows[: len(scored.montage)]]
    plot_lidc_montage(images, labels, calibration, mean, samples, out / "montage.png", titles=titles)
    return {
        **report_head(model_label, checkpoint, split, len(scored.rows), metrics),
        "references": reference_metrics,
        "volumes": volumes.aggregate(per_nodule),
        "protocol": settings.protocol_card(datalist, sampler_options, reference_metrics),
        "presence_reliability": {label: _presence_record(curve) for label, curve in presence_curves.items()},
        "reliability": reliability_record(reliability),
        "hypothesis_reliability": {label: curve.to_dict() for label, curve in hypothesis_curves.items()},
    }


def _logged_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a report: the model's, the rows' as ``ref_<row>_<metric>``, the volumes' as
    ``vol_<metric>``."""
    volumes = {f"vol_{name}": value for name, value in report["volumes"].items()}
    return {**report["metrics"], **flatten_references(report["references"]), **volumes}


def _presence_record(curve) -> dict[str, list]:
    return {
        "bin_edges": curve.bin_edges.tolist(),
        "sample_empty": [None if math.isnan(v) else v for v in curve.sample_empty.tolist()],
        "reader_empty": [None if math.isnan(v) else v for v in curve.reader_empty.tolist()],
        "count": curve.count.tolist(),
    }


def evaluate_lidc(
    calibration_network: torch.nn.Module,
    refinement_network: torch.nn.Module,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    settings: LidcEvaluationSettings | None = None,
    sampler_options: SamplerOptions = DEFAULT_EVALUATION_SAMPLER,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    model_label: str = "CAR",
    montage_cases: int = 8,
    tracking_uri: str | None = None,
    experiment_name: str = "car_lidc",
    run_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score G's samples and F's calibration on one split, beside the reference rows, and write the report.

    The steps, each callable on its own: :func:`~car_med.evaluation.start.start_evaluation`, :func:`score_split`
    (the 2D draw: the model and the reference rows), :func:`draw_nodule_volumes` (the 3D draw; the hypotheses
    are scored on it), :func:`write_lidc_report_files` (the CSVs, figures and the card) and
    :func:`~car_med.evaluation.report_files.write_report` (``metrics.json``, MLflow). The files are
    :data:`REPORT_FILES`, described in docs/metrics.md; with ``tracking_uri`` they and the metrics also go to a
    new MLflow run.

    Args:
        calibration_network: F (weights from ``checkpoint`` if given).
        refinement_network: G (weights from ``checkpoint`` if given).
        datalist: the dataset's ``datalist.json``.
        output_dir: where the report goes.
        settings: what decides the numbers (:class:`LidcEvaluationSettings`; its defaults when ``None``).
        sampler_options: G's sampler (``max_batch``, ``noise_std``, ``min_component_size``).
        checkpoint: a stage-2 checkpoint holding ``calibration_network`` and ``refinement_network``.
        device: where to run.
        batch_size: cases per batch.
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
    settings = settings if settings is not None else LidcEvaluationSettings()
    out, cases, sampler = start_evaluation(
        calibration_network,
        refinement_network,
        datalist=datalist,
        split=settings.split,
        read_split=load_lidc_datalist,
        output_dir=output_dir,
        checkpoint=checkpoint,
        device=device,
        max_cases=settings.max_cases,
        sampler_options=sampler_options,
    )
    volumes = NoduleVolumes(settings.volume_samples) if settings.noise == "case" else None
    scored = score_split(
        sampler,
        cases,
        settings,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        montage_cases=montage_cases,
        progress=progress,
        volumes=volumes,
    )
    if volumes is None:  # noise="nodule": the 3D metrics need their own draw, one noise per nodule
        volumes = draw_nodule_volumes(
            sampler, cases, settings, device=device, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
    report = write_lidc_report_files(
        out,
        scored,
        volumes,
        settings,
        datalist=datalist,
        sampler_options=sampler_options,
        checkpoint=checkpoint,
        model_label=model_label,
    )
    description = f"{model_label} on {settings.split} ({len(scored.rows)} cases)"
    logged = _logged_metrics(report)
    return write_report(
        out, report, description, tracking_uri, experiment_name, run_name, {}, logged, REPORT_FILES, log=logger
    )
