"""The tiny registered CAR model that prediction runs, and the export tests' helpers prediction's checks reuse."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# predict writes the review export: its files are checked with the export tests' helpers (tests/export)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))


@pytest.fixture(scope="session")
def export_model(tmp_path_factory, lidc_home):
    """``models:/car-lidc/1`` in a SQLite store: the tiny F and G of tests/tiny_car.py, untrained."""
    from registered_tiny_car import register_tiny_car

    return register_tiny_car(tmp_path_factory.mktemp("predict_registry"))
