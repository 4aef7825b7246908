"""Scoring CAR's samples the way the literature does: per-case seeded sampling, GED/HM-IoU/diversity/ECE."""

from __future__ import annotations

from .inference import PREDICTION_KEYS, write_case_predictions
from .lidc import (
    LidcEvaluationSettings,
    ScoredSplit,
    draw_nodule_volumes,
    evaluate_lidc,
    score_split,
    write_lidc_report_files,
)
from .protocol import METRIC_DEFINITIONS, dataset_card
from .sample_metrics import (
    CASE_INDEX_KEY,
    SampleMetricSuite,
    case_generator,
    evaluate_samples,
    sample_cases,
    with_case_index,
)
from .start import DEFAULT_EVALUATION_SAMPLER, StartedEvaluation, start_evaluation
from .volumes import NOISE_MODES, with_nodule_noise

__all__ = [
    "CASE_INDEX_KEY",
    "DEFAULT_EVALUATION_SAMPLER",
    "LidcEvaluationSettings",
    "ScoredSplit",
    "StartedEvaluation",
    "draw_nodule_volumes",
    "score_split",
    "start_evaluation",
    "write_lidc_report_files",
    "METRIC_DEFINITIONS",
    "NOISE_MODES",
    "PREDICTION_KEYS",
    "SampleMetricSuite",
    "case_generator",
    "dataset_card",
    "evaluate_lidc",
    "evaluate_samples",
    "sample_cases",
    "with_case_index",
    "with_nodule_noise",
    "write_case_predictions",
]
