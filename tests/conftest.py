"""Shared pytest fixtures: keep every test on a small CPU budget and off the user's home dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_nets():
    """F, G and D small enough for CPU tests (see tests/tiny_car.py)."""
    from tiny_car import make_tiny_nets

    return make_tiny_nets()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """pylidc and mlflow may write to ~; point HOME at a temp dir so tests never touch the real one."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    # a test (or a demo main() run in-process) may set mlflow's process-wide tracking URI: forget it
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def lidc_home(tmp_path_factory):
    """A HOME for the whole session; the autouse HOME fixture is function-scoped and comes too late."""
    home = tmp_path_factory.mktemp("lidc_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def pylidc_module(lidc_home):
    from preprocessing.lidc_annotations import import_pylidc

    return import_pylidc()


@pytest.fixture(scope="session")
def clean_cohort(tmp_path_factory, lidc_home) -> Path:
    """Synthetic DICOM root with the reference cohort (``preprocessing.synthetic_lidc.REFERENCE_COHORT``).

    Six small real DB patients: two 3-annotator nodules (0957), one border nodule (0983), 1- and 4-annotator
    nodules (0611, 0719), two CT scans of one patient (0365), and a 4-nodule scan (0078).
    """
    from preprocessing.synthetic_lidc import REFERENCE_COHORT, build_cohort

    root = tmp_path_factory.mktemp("lidc_dicom_clean")
    build_cohort(root, REFERENCE_COHORT)
    return root


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory, clean_cohort, lidc_home) -> Path:
    """Output folder of an uninterrupted single-process run on the clean cohort."""
    from preprocessing.lidc import run

    out = tmp_path_factory.mktemp("lidc_out_clean")
    run(clean_cohort, out, workers=1, progress=False)
    return out
