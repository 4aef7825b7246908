"""Shared pytest fixtures: keep every test on a small CPU budget and off the user's home dir."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

THREADS_VARIABLE = "CAR_MED_TEST_THREADS"


def _cores_busy_elsewhere(window: float = 0.5) -> float:
    """How many cores other processes kept busy over ``window`` seconds (this one sleeps meanwhile); 0 off Linux."""

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    try:
        busy0, total0 = busy_and_total()
        time.sleep(window)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def _torch_threads() -> int:
    """Intra-op threads of the test process: 2 while 2 cores are idle, else 1 (another process keeps a core busy).

    A 2-thread pool on 2 shared cores waits at every op for its descheduled half: with another process busy, a
    small convolution took 63 ms on 2 threads against 1.5 ms on 1, and the short tail-calibration training 5x
    longer. ``CAR_MED_TEST_THREADS=n`` sets the count.
    """
    if os.environ.get(THREADS_VARIABLE):
        return max(1, int(os.environ[THREADS_VARIABLE]))
    idle_cores = (os.cpu_count() or 1) - _cores_busy_elsewhere()
    return 2 if idle_cores >= 1.5 else 1


torch.set_num_threads(_torch_threads())


def pytest_report_header(config) -> str:
    return f"torch intra-op threads: {torch.get_num_threads()} (set {THREADS_VARIABLE} to choose)"


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
