"""The export tests' cohort settings, in a module of its own name: every test folder has a ``conftest``, so
``from conftest import ...`` gets whichever one pytest imported last."""

from __future__ import annotations

import json
from pathlib import Path

#: 0611: one 1-annotator nodule; 0983: a 2-annotator nodule at the image border (padded crops)
EXPORT_PATIENTS = ("LIDC-IDRI-0611", "LIDC-IDRI-0983")
NUM_SAMPLES = 4


def split_of(datalist: Path, patient_id: str) -> str:
    content = json.loads(datalist.read_text())
    for split in ("training", "validation", "test"):
        if any(item["patient_id"] == patient_id for item in content.get(split, [])):
            return split
    raise AssertionError(f"{patient_id} is in no split of {datalist}")
