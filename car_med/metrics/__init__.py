"""car_med.metrics: GED, Hungarian-matched IoU, ECE, stochastic-class calibration, G's noise response and
hypothesis calibration.

Conventions (SPEC section 2, docs/metrics.md): hard samples are integer argmax maps ``(B, N, *spatial)``, labels are
integer maps ``(B, R, *spatial)``, d(a, b) = 1 - IoU(a, b), a class absent from both maps is skipped and a pair with
every class absent has IoU 1, and GED uses the biased (diagonal-including) means unless ``unbiased=True``.
"""

from __future__ import annotations

from car_med.data.stochastic_classes import (
    CITYSCAPES_IGNORE_INDEX,
    CITYSCAPES_STOCHASTIC_CLASSES,
    CITYSCAPES_SWITCHABLE_CLASSES,
    stochastic_label_modes,
    stochastic_mode_flips,
    stochastic_mode_weights,
)
from car_med.metrics.calibration import (
    ClassCalibrationResult,
    ExpectedCalibrationError,
    ReliabilityData,
    StochasticClassCalibration,
    calibration_bin_statistics,
    calibration_result_from_sums,
    class_calibration_offsets,
    class_calibration_statistics,
    expected_calibration_error,
    plot_reliability_diagram,
)
from car_med.metrics.energy_distance import (
    EnergyDistanceTerms,
    GeneralizedEnergyDistance,
    SampleDiversity,
    energy_distance_from_iou,
    generalized_energy_distance,
    sample_diversity,
)
from car_med.metrics.hungarian_iou import HungarianMatchedIoU, hungarian_matched_iou, matched_iou_from_matrix
from car_med.metrics.hypotheses import (
    HypothesisReliability,
    ScoredHypotheses,
    hypothesis_reliability,
    match_readers,
    plot_hypothesis_reliability,
    score_hypotheses,
)
from car_med.metrics.noise_response import (
    class_sample_spread_statistics,
    noise_response_from_sums,
    reference_spread,
)
from car_med.metrics.pairwise import PairwiseIoU, pairwise_iou

__all__ = [
    "CITYSCAPES_IGNORE_INDEX",
    "CITYSCAPES_STOCHASTIC_CLASSES",
    "CITYSCAPES_SWITCHABLE_CLASSES",
    "ClassCalibrationResult",
    "EnergyDistanceTerms",
    "ExpectedCalibrationError",
    "GeneralizedEnergyDistance",
    "HungarianMatchedIoU",
    "HypothesisReliability",
    "PairwiseIoU",
    "ReliabilityData",
    "SampleDiversity",
    "ScoredHypotheses",
    "StochasticClassCalibration",
    "calibration_bin_statistics",
    "calibration_result_from_sums",
    "energy_distance_from_iou",
    "class_calibration_offsets",
    "class_calibration_statistics",
    "class_sample_spread_statistics",
    "expected_calibration_error",
    "generalized_energy_distance",
    "noise_response_from_sums",
    "hungarian_matched_iou",
    "hypothesis_reliability",
    "match_readers",
    "matched_iou_from_matrix",
    "pairwise_iou",
    "plot_hypothesis_reliability",
    "plot_reliability_diagram",
    "reference_spread",
    "sample_diversity",
    "score_hypotheses",
    "stochastic_label_modes",
    "stochastic_mode_flips",
    "stochastic_mode_weights",
]
