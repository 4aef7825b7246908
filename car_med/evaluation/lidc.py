"""Table-1 evaluation of a CAR model on an LIDC split: metrics.json with its protocol card and the reference
rows, a per-case CSV, F's reliability diagram, the presence-calibration plot, the hypotheses' reliability
diagram, a sample montage, and the same numbers in MLflow."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
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
    start_evaluation,
    write_per_case_csv,
    write_report,
)
from car_med.evaluation.sample_metrics import SampleMetricSuite, evaluate_samples, sample_cases
from car_med.evaluation.volumes import NOISE_MODES, NoduleVolumes, with_nodule_noise
from car_med.hypotheses import DEFAULT_MIN_IOU
from car_med.metrics import plot_reliability_diagram
from car_med.metrics.hypotheses import DEFAULT_COVERAGE_PROBABILITY, DEFAULT_HYPOTHESIS_BINS
from car_med.metrics.presence import DEFAULT_MIN_AREA, DEFAULT_SPECKLE_SIZE, plot_presence_reliability

__all__ = ["CASE_FIELDS", "evaluate_lidc"]

logger = logging.getLogger(__name__)

CASE_FIELDS = ("case_index", "patient_id", "series_uid", "nodule_id", "slice_z", "num_annotators")


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
    reference_rows: Sequence[str] = REFERENCE_ROWS,
    presence_min_area: int = DEFAULT_MIN_AREA,
    speckle_size: int = DEFAULT_SPECKLE_SIZE,
    noise: str = "nodule",
    volume_samples: int = 16,
    min_component_size: int = 0,
    hypothesis_min_iou: float = DEFAULT_MIN_IOU,
    hypothesis_reference_rows: Sequence[str] = HYPOTHESIS_REFERENCE_ROWS,
) -> dict[str, Any]:
    """Score G's samples and F's calibration on one split, beside the reference rows, and write the report.

    Writes into ``output_dir``: ``metrics.json`` (the numbers, N, the checkpoint, the reference rows'
    numbers under ``references`` and the protocol card: dataset source, split seed and counts, sample counts,
    noise seed and every metric's and reference row's definition, including the empty-empty rule),
    ``per_case.csv`` (one row per case with its ids, per-case metrics and each reference row's, as
    ``<row>_<metric>``), ``per_nodule.csv`` (one row per nodule: its 3D metrics, the model's number of
    hypotheses and the reader slots they cover), ``reliability.png`` (F's reliability diagram), ``presence.png``
    (presence calibration of the model and the rows), ``hypotheses_reliability.png`` (the nodules' hypotheses
    binned by probability against the share of readers assigned to them: the model, the majority vote and the
    readers' leave-one-out) and ``montage.png`` (the first cases' readers, F, Gbar and samples). With
    ``tracking_uri`` the metrics (the rows' as ``ref_<row>_<metric>``) and files also go to a new MLflow run.

    The hypothesis numbers (:mod:`car_med.evaluation.hypotheses`, docs/metrics.md) are taken on the 3D draw:
    each nodule's ``volume_samples`` sample volumes grouped into hypotheses, each reader slot's volume assigned
    to the one it matches; they go into ``metrics`` and into the rows of ``references`` as ``hypothesis_ece``,
    ``hypothesis_coverage``, ``hypothesis_uncovered``, ``hypothesis_unmatched`` and ``hypotheses_per_nodule``,
    with the per-bin tables under ``hypothesis_reliability``.

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
        reference_rows: the rows of :mod:`car_med.evaluation.references` to score (all four by default).
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
        min_component_size: the sampler's (:class:`~car_med.sampling.CARSampler`): foreground components of a
            sample under this many pixels become background; 0 (default) keeps G's plain argmax.
        hypothesis_min_iou: the IoU every two members of a nodule's hypothesis share at least
            (:func:`car_med.hypotheses.group_samples`), and that a reader's volume needs with a hypothesis's
            representative to be assigned to it.
        hypothesis_reference_rows: the reference rows scored as hypotheses, from
            :data:`~car_med.evaluation.hypotheses.HYPOTHESIS_REFERENCE_ROWS` (both by default): the majority vote
            (one hypothesis, p = 1) and the readers' leave-one-out.

    Returns:
        The content of ``metrics.json``.
    """
    from car_med.visualize.lidc import plot_lidc_montage

    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}.")
    # checked before any sampling: a bad min_iou or row would otherwise fail after the whole split was drawn
    hypotheses = NoduleHypotheses(min_iou=hypothesis_min_iou, rows=hypothesis_reference_rows)
    out, items, sampler = start_evaluation(locals(), load_lidc_datalist)
    volumes = NoduleVolumes(volume_samples)
    transform = lidc_transforms("eval", roi_size=roi_size, hu_window=hu_window)
    loader = DataLoader(Dataset(items, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    suite = SampleMetricSuite(
        ged_counts,
        hm_iou_counts,
        diversity_count,
        ece_bins,
        presence_min_area=presence_min_area,
        speckle_size=speckle_size,
    )
    if not 1 <= volume_samples <= suite.max_samples:
        raise ValueError(
            f"volume_samples={volume_samples} must be between 1 and the {suite.max_samples} samples drawn per case "
            "(the largest GED, HM-IoU or diversity count)."
        )
    references = ReferenceRows(suite, reference_rows) if reference_rows else None
    rows: list[dict[str, Any]] = []
    kept: list = []

    def add_volumes(batch, samples) -> None:
        affines = batch["image"].affine.reshape(-1, 4, 4)
        for i in range(samples.shape[0]):
            volumes.add(case_row(batch, i, CASE_FIELDS), samples[i], torch.as_tensor(batch["label"][i]), affines[i])

    def collect(batch, drawn) -> None:
        if noise == "case":
            add_volumes(batch, drawn.samples)
        for i in range(drawn.samples.shape[0]):
            rows.append(case_row(batch, i, CASE_FIELDS))
            if len(kept) < montage_cases:
                kept.append(
                    (batch["image"][i], batch["label"][i], drawn.calibration[i], drawn.mean[i], drawn.samples[i])
                )

    metrics = evaluate_samples(
        sampler, loader, suite, seed, device, on_batch=collect, progress=progress, references=references
    )
    if noise == "nodule":
        # the 2D metrics keep the literature's protocol (every crop its own draw: more independent draws, less
        # variance); the 3D metrics need sample m to be one hypothesis on all of a nodule's crops, a second draw
        nodule_loader = DataLoader(
            Dataset(with_nodule_noise(items, "nodule"), transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
        )
        for batch, drawn in sample_cases(sampler, nodule_loader, volume_samples, seed, device, progress=progress):
            add_volumes(batch, drawn.samples)
    reference_metrics = references.aggregate() if references is not None else {}
    per_case = {**suite.per_case(), **(references.per_case() if references is not None else {})}
    write_per_case_csv(out / "per_case.csv", rows, CASE_FIELDS, per_case)
    per_nodule = volumes.per_nodule()
    hypotheses.add_nodules(per_nodule, volumes.stacks())
    nodule_fields = ("patient_id", "series_uid", "nodule_id", "num_slices")
    nodule_metrics = {k: [r[k] for r in per_nodule] for k in per_nodule[0] if k not in nodule_fields}
    write_per_case_csv(out / "per_nodule.csv", per_nodule, nodule_fields, nodule_metrics)
    volume_metrics = volumes.aggregate(per_nodule)
    # added to the 2D metrics and to the rows, not in place of anything: every earlier number stays as it was
    model_hypotheses, row_hypotheses, hypothesis_curves = hypotheses.report(
        model_label, REFERENCE_LABELS, out / "hypotheses_reliability.png", title=f"hypotheses, LIDC {split}"
    )
    metrics.update(model_hypotheses)
    for row, values in row_hypotheses.items():
        reference_metrics.setdefault(row, {}).update(values)
    reliability = suite.reliability()
    plot_reliability_diagram(reliability, out / "reliability.png", title=f"F on LIDC {split}")
    presence_curves = {model_label: suite.presence_reliability()}
    if references is not None:
        presence_curves.update(
            {REFERENCE_LABELS[row]: s.presence_reliability() for row, s in references.suites.items()}
        )
    plot_presence_reliability(
        presence_curves,
        out / "presence.png",
        title=f"presence calibration, LIDC {split} (empty: < {presence_min_area} px)",
    )
    images, labels, calibration, mean, samples = zip(*kept)
    titles = [f"{r.get('patient_id', '')} z={r.get('slice_z', '')}" for r in rows[: len(kept)]]
    plot_lidc_montage(images, labels, calibration, mean, samples, out / "montage.png", titles=titles)

    report = {
        **report_head(model_label, checkpoint, split, len(rows), metrics),
        "references": reference_metrics,
        "volumes": volume_metrics,
        "protocol": {
            "noise": noise,
            "volume_samples": volume_samples,
            "dataset": dataset_card(datalist),
            "evaluated_cases": "all" if max_cases is None else f"first {max_cases}",
            "sample_counts": {"ged": list(ged_counts), "hm_iou": list(hm_iou_counts), "diversity": diversity_count},
            "seed": seed,
            "roi_size": list(roi_size),
            "hu_window": list(hu_window),
            "presence_min_area": presence_min_area,
            "speckle_size": speckle_size,
            "min_component_size": min_component_size,
            "hypothesis_min_iou": hypothesis_min_iou,
            "hypothesis_bins": DEFAULT_HYPOTHESIS_BINS,
            "hypothesis_coverage_min_probability": DEFAULT_COVERAGE_PROBABILITY,
            "metric_definitions": METRIC_DEFINITIONS,
            "reference_definitions": {row: REFERENCE_DEFINITIONS[row] for row in reference_metrics},
        },
        "presence_reliability": {
            label: {
                "bin_edges": curve.bin_edges.tolist(),
                "sample_empty": [None if math.isnan(v) else v for v in curve.sample_empty.tolist()],
                "reader_empty": [None if math.isnan(v) else v for v in curve.reader_empty.tolist()],
                "count": curve.count.tolist(),
            }
            for label, curve in presence_curves.items()
        },
        "reliability": reliability_record(reliability),
        "hypothesis_reliability": {label: curve.to_dict() for label, curve in hypothesis_curves.items()},
    }
    return write_report(
        out,
        report,
        f"{model_label} on {split} ({len(rows)} cases)",
        tracking_uri,
        experiment_name,
        run_name,
        {},
        {**metrics, **flatten_references(reference_metrics), **{f"vol_{k}": v for k, v in volume_metrics.items()}},
        (
            "metrics.json",
            "per_case.csv",
            "per_nodule.csv",
            "reliability.png",
            "presence.png",
            "hypotheses_reliability.png",
            "montage.png",
        ),
        logger,
    )
