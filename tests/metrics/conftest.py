"""Metric tests run many tiny tensor ops: one intra-op thread avoids OpenMP barrier waits on a busy CPU."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
