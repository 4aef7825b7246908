"""The Cityscapes demo's pieces: its acceptance table, checks, log parsing and sample grid (the full demo trains for
about half an hour on two cores, so the tests run its parts; tests/bundles runs the bundle commands for 2 iterations).
"""

from __future__ import annotations

import numpy as np
import pytest

from car_med.experiments.cityscapes_demo import (
    CLASSES,
    MODELS,
    PALETTE,
    acceptance,
    acceptance_row,
    bundle_command,
    colourise,
    engine_seconds,
    format_table,
    render_sample_grid,
)

TRUE = {"sidewalk": 8 / 17, "person": 7 / 17, "car": 6 / 17, "vegetation": 5 / 17, "road": 4 / 17}


def _report(g_shift: float, f_shift: float | None, ged: float, diversity: float, noise: float = 1.0) -> dict:
    rows = []
    for name in CLASSES:
        p = TRUE[name]
        f = None if f_shift is None else p + f_shift
        rows.append(
            {
                "class": name,
                "true": p,
                "f": f,
                "g": p + g_shift,
                "f_offset": None if f is None else abs(f - p),
                "g_offset": abs(g_shift),
            }
        )
    return {
        "metrics": {"ged16": ged, "diversity16": diversity, "g_noise_response": noise},
        "class_calibration": rows,
    }


def test_acceptance_row_reads_the_report_and_takes_g_minus_f():
    row = acceptance_row(_report(g_shift=0.04, f_shift=0.01, ged=0.2, diversity=0.5))
    assert row["g_freq"]["person"] == pytest.approx(7 / 17 + 0.04)
    assert row["g_minus_f"]["road"] == pytest.approx(0.03)
    assert row["ged16"] == 0.2 and row["diversity16"] == 0.5
    no_f = acceptance_row(_report(g_shift=0.0, f_shift=None, ged=0.05, diversity=0.4))
    assert no_f["g_minus_f"]["car"] is None


def test_acceptance_checks_each_item_of_issue_10():
    rows = {
        "CAR": acceptance_row(_report(g_shift=0.08, f_shift=0.02, ged=0.3, diversity=0.5)),
        "cGAN+L_cal(gt)": acceptance_row(_report(g_shift=0.01, f_shift=None, ged=0.05, diversity=0.5)),
        "cGAN+L_ce": acceptance_row(_report(g_shift=-0.4, f_shift=0.02, ged=0.6, diversity=0.01, noise=0.04)),
        "cGAN+L_ce (last)": acceptance_row(_report(g_shift=-0.4, f_shift=0.02, ged=0.6, diversity=0.3, noise=0.2)),
    }
    checks = acceptance(rows)
    assert checks["CAR: F offsets within 0.05"]
    assert not checks["CAR: G within 0.05 of F"]  # 0.06 from F
    assert checks["cGAN+L_cal(gt): flip frequencies within 0.05"]
    assert checks["cGAN+L_cal(gt): GED16 < 0.1"]
    assert checks["cGAN+L_ce: diversity16 < 0.05"]
    assert checks["cGAN+L_ce: G's noise response < 0.1"]
    assert not checks["cGAN+L_ce (last): diversity16 < 0.05"]
    assert not checks["cGAN+L_ce (last): G's noise response < 0.1"]
    rows["cGAN+L_ce"]["g_noise_response"] = None  # an evaluation without G's probabilities proves nothing
    assert not acceptance(rows)["cGAN+L_ce: G's noise response < 0.1"]


def test_table_has_the_true_row_f_row_and_one_g_row_per_model():
    rows = {
        "CAR": acceptance_row(_report(g_shift=0.01, f_shift=0.02, ged=0.3, diversity=0.5)),
        "cGAN+L_ce": acceptance_row(_report(g_shift=0.0, f_shift=0.02, ged=0.6, diversity=0.0, noise=0.034)),
    }
    lines = format_table(rows, {"CAR": 431.2}).splitlines()
    assert lines[0].split()[:5] == list(CLASSES)
    assert lines[2].split()[:3] == ["true", "p", "0.471"]
    assert lines[3].startswith("CAR: F")
    assert lines[4].startswith("CAR: G") and lines[4].split()[-1] == "431"
    assert lines[5].startswith("cGAN+L_ce: G") and lines[5].split()[-2:] == ["0.03", "-"]
    assert lines[0].split()[-3:] == ["noise", "train", "s"]


def test_engine_seconds_reads_ignites_run_times():
    log = (
        "2026-01-01 - ignite.engine.engine.SupervisedTrainer - INFO - Engine run complete. Time taken: 00:01:02.500\n"
        "noise\n"
        "2026-01-01 - ignite.engine.engine.CARTrainer - INFO - Engine run complete. Time taken: 01:00:00.000\n"
    )
    assert engine_seconds(log) == [62.5, 3600.0]


def test_bundle_command_merges_the_bundle_files_in_order():
    command = bundle_command("training", ["train.json", "demo.json"], ["--output_dir", "RUN"])
    assert command[1:5] == ["-m", "monai.bundle", "run", "training"]
    files = command[6]
    assert files.startswith("[") and files.index("train.json") < files.index("demo.json")
    assert [m[0] for m in MODELS] == ["CAR", "cGAN+L_cal(gt)", "cGAN+L_ce"]


def test_sample_grid_is_written_with_the_palette(tmp_path):
    assert len(PALETTE) == 25
    ids = np.array([[0, 19], [24, 30]])
    rgb = colourise(ids)
    assert rgb.shape == (2, 2, 3) and tuple(rgb[0, 1]) == PALETTE[19] and tuple(rgb[1, 1]) == PALETTE[24]
    image = np.random.default_rng(0).random((2, 8, 16, 3))
    labels = np.random.default_rng(1).integers(0, 25, size=(2, 8, 16))
    path = render_sample_grid([("image", image), ("label", labels), ("G 1", labels)], 2, tmp_path / "grid.png")
    assert path.is_file() and path.stat().st_size > 1000
