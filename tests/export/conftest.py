"""A tiny registered CAR model and one export of two synthetic patients, shared by the export tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_cohort import EXPORT_PATIENTS, NUM_SAMPLES, split_of  # noqa: E402


@pytest.fixture(scope="session")
def export_model(tmp_path_factory, lidc_home):
    """``models:/car-lidc/1`` in a SQLite store: the tiny F and G of tests/tiny_car.py, untrained."""
    from registered_tiny_car import register_tiny_car

    return register_tiny_car(tmp_path_factory.mktemp("export_registry"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, clean_run, clean_cohort, export_model, lidc_home):
    """One export of both patients with the CT overlays and DICOM SEG (each patient from its own split)."""
    from car_med.export import export_cases

    datalist = clean_run / "datalist.json"
    out = tmp_path_factory.mktemp("export")
    summaries = []
    for patient in EXPORT_PATIENTS:
        summaries.append(
            export_cases(
                export_model["uri"],
                datalist,
                out,
                split=split_of(datalist, patient),
                cases=[patient],
                num_samples=NUM_SAMPLES,
                seed=0,
                dicom_root=clean_cohort,
                full_volume=True,
                dicom_seg=True,
                tracking_uri=export_model["tracking_uri"],
                progress=False,
            )
        )
    return {"dir": out, "summaries": summaries, "datalist": datalist, "dicom_root": clean_cohort, **export_model}
