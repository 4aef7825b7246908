"""Shared pytest fixtures: keep every test on a small CPU budget and off the user's home dir."""

from __future__ import annotations

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
