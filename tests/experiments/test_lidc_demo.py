"""The LIDC demo's result table (the full demo runs in minutes, so CI runs its pieces: tests/bundles)."""

from __future__ import annotations

import pytest

from car_med.experiments.lidc_demo import (
    COHORT_MARKER,
    HYPOTHESIS_SHOWN,
    METRICS_SHOWN,
    format_hypothesis_table,
    format_table,
    hypothesis_rows,
    main,
)

_METRICS = ("ged16", "hm_iou16", "diversity16", "presence_gap", "speckle")


def _metrics(*values: float) -> dict[str, float]:
    return dict(zip(_METRICS, values))


def test_table_has_one_row_per_model_then_the_four_reference_rows():
    references = {
        "readers_oracle": _metrics(0.025, 0.915, 0.33, 0.05, 0.0),
        "majority_vote": _metrics(0.246, 0.699, 0.0, 0.19, 0.0),
        "f_threshold": _metrics(0.5, 0.55, 0.0, 0.2, 0.001),
        "f_bernoulli": _metrics(0.4, 0.26, 0.7, 0.3, 0.37),
    }
    reports = {
        "CAR": {"metrics": _metrics(0.31234, 0.5, 0.25, 0.1, 0.004), "num_cases": 12, "references": references},
        "cGAN+L_ce": {"metrics": _metrics(0.4, 0.45, 0.01, 0.3, 0.02), "num_cases": 12, "references": references},
    }
    lines = format_table(reports).splitlines()
    assert METRICS_SHOWN == _METRICS
    assert lines[0].split() == ["predictor", *_METRICS, "test", "cases"]
    assert lines[2].split() == ["CAR", "0.3123", "0.5000", "0.2500", "0.1000", "0.0040", "12"]
    assert lines[3].split() == ["cGAN+L_ce", "0.4000", "0.4500", "0.0100", "0.3000", "0.0200", "12"]
    assert lines[4].startswith("- reference rows")
    assert lines[5].split() == ["readers'", "oracle", "0.0250", "0.9150", "0.3300", "0.0500", "0.0000", "12"]
    assert lines[6].split()[:4] == ["majority", "vote", "0.2460", "0.6990"]
    assert lines[7].split()[:4] == ["F", ">", "0.5", "0.5000"]
    assert lines[8].split()[:3] == ["F", "Bernoulli", "0.4000"]
    assert len(lines) == 9


def _hypotheses(ece: float, coverage: float, per_nodule: float) -> dict[str, float]:
    return dict(zip(HYPOTHESIS_SHOWN, (ece, coverage, 1.0 - coverage, per_nodule)))


def _reports_with_hypotheses() -> dict[str, dict]:
    references = {
        "readers_oracle": _metrics(0.025, 0.915, 0.33, 0.05, 0.0),
        "majority_vote": {**_metrics(0.246, 0.699, 0.0, 0.19, 0.0), **_hypotheses(0.3, 0.7, 1.0)},
        "readers_leave_one_out": _hypotheses(0.08, 0.8, 1.75),  # scored on the nodules' hypotheses only
    }
    return {
        "CAR": {
            "metrics": {**_metrics(0.3, 0.5, 0.25, 0.1, 0.0), **_hypotheses(0.05, 0.9, 2.5)},
            "num_cases": 12,
            "references": references,
        },
        "cGAN+L_ce": {
            "metrics": {**_metrics(0.4, 0.45, 0.01, 0.3, 0.0), **_hypotheses(0.2, 0.6, 1.2)},
            "num_cases": 12,
            "references": references,
        },
    }


def test_the_crop_table_leaves_out_the_row_scored_on_hypotheses_only():
    lines = format_table(_reports_with_hypotheses()).splitlines()
    assert [line.split()[0] for line in lines[5:]] == ["readers'", "majority"]
    assert not any("leave-one-out" in line for line in lines)


def test_hypothesis_table_has_both_models_then_the_majority_vote_and_the_readers_leave_one_out():
    rows = hypothesis_rows(_reports_with_hypotheses())
    assert list(rows) == ["CAR", "cGAN+L_ce", "majority vote", "readers' leave-one-out"]
    assert rows["readers' leave-one-out"] == _hypotheses(0.08, 0.8, 1.75)
    assert rows["majority vote"] == _hypotheses(0.3, 0.7, 1.0)  # its crop metrics stay in the first table
    lines = format_hypothesis_table(rows).splitlines()
    assert lines[0].split() == ["predictor", "hypothesis", "ECE", "coverage", "uncovered", "per", "nodule"]
    assert lines[2].split() == ["CAR", "0.0500", "0.9000", "0.1000", "2.5000"]
    assert lines[3].split() == ["cGAN+L_ce", "0.2000", "0.6000", "0.4000", "1.2000"]
    assert lines[4].split() == ["majority", "vote", "0.3000", "0.7000", "0.3000", "1.0000"]
    assert lines[5].split() == ["readers'", "leave-one-out", "0.0800", "0.8000", "0.2000", "1.7500"]
    assert len(lines) == 6


def test_a_cohort_from_the_earlier_generator_is_refused_not_reused(tmp_path):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / ".complete").write_text("done\n")  # what the generator before the lung pocket wrote
    with pytest.raises(SystemExit, match="earlier synthetic generator"):
        main(["--output-dir", str(tmp_path)])
    assert "v3" in COHORT_MARKER


def test_a_missing_overlay_is_named_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "out"), "--overlay", str(tmp_path / "nope.json")])
    assert "no such bundle config file" in capsys.readouterr().err and not (tmp_path / "out").exists()
