"""Fixtures for tests/data: a synthetic LIDC datalist in the preprocessing output format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lidc_synth import write_item


@pytest.fixture(scope="session")
def hu_datalist(tmp_path_factory) -> Path:
    """datalist.json with 3 training items, 2 validation items (3 readers + 1 empty slot) and no test split."""
    root = tmp_path_factory.mktemp("lidc_hu")
    content = {
        "training": [write_item(root, f"train{i}", i, f"LIDC-IDRI-000{i}") for i in range(3)],
        "validation": [write_item(root, f"val{i}", 3 + i, f"LIDC-IDRI-001{i}") for i in range(2)],
    }
    content["validation"][1]["slice_z"] = 7  # an integer z is still a position in mm
    path = root / "datalist.json"
    path.write_text(json.dumps(content))
    return path
