"""The LIDC demo's result table (the full demo runs in minutes, so CI runs its pieces: tests/bundles)."""

from __future__ import annotations

from car_med.experiments.lidc_demo import METRICS_SHOWN, format_table


def test_table_has_one_row_per_model_with_the_three_metrics():
    reports = {
        "CAR": {"metrics": {"ged16": 0.31234, "hm_iou16": 0.5, "diversity16": 0.25}, "num_cases": 12},
        "cGAN+L_ce": {"metrics": {"ged16": 0.4, "hm_iou16": 0.45, "diversity16": 0.01}, "num_cases": 12},
    }
    lines = format_table(reports).splitlines()
    assert METRICS_SHOWN == ("ged16", "hm_iou16", "diversity16")
    assert lines[0].split() == ["model", "ged16", "hm_iou16", "diversity16", "test", "cases"]
    assert lines[2].split() == ["CAR", "0.3123", "0.5000", "0.2500", "12"]
    assert lines[3].split() == ["cGAN+L_ce", "0.4000", "0.4500", "0.0100", "12"]
