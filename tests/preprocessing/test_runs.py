from __future__ import annotations

import argparse
import logging

import pytest

from preprocessing.runs import run_command


def _run(root: str, output_dir: str, workers: int = 1, progress: bool = True) -> dict:
    return {"root": root, "output_dir": output_dir, "workers": workers, "progress": progress}


def test_run_command_passes_each_parameter_its_argument_and_logs_the_summary(caplog: pytest.LogCaptureFixture):
    arguments = argparse.Namespace(root="in", output_dir="out", workers=3, no_progress=True, report=None)
    logger = logging.getLogger("test_runs")
    with caplog.at_level(logging.INFO, logger="test_runs"):
        summary = run_command(_run, arguments, lambda s: f"{s['workers']} workers", logger)
    # 'report' is not a parameter of run and is left out; --no-progress turns progress off
    assert summary == {"root": "in", "output_dir": "out", "workers": 3, "progress": False}
    assert caplog.messages == ["3 workers; outputs in out"]


def test_run_command_keeps_a_default_the_cli_does_not_set():
    arguments = argparse.Namespace(root="in", output_dir="out", no_progress=False)
    summary = run_command(_run, arguments, str, logging.getLogger("test_runs"))
    assert summary["workers"] == 1 and summary["progress"] is True
