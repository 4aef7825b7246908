"""Preprocessing's outputs on the reference cohort, frozen byte for byte.

The checksums in ``lidc_clean_run.sha256`` were recorded before the CT reading and the crop geometry moved
from ``preprocessing/`` into ``car_med.ct``; any change to a crop voxel, an affine, a mask, the datalist or
the bookkeeping shows here. Record them again (``CAR_MED_RECORD_CHECKSUMS=1``) only for a change that is meant
to alter the outputs, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

RECORD = Path(__file__).with_name("lidc_clean_run.sha256")


def _checksums(root: Path, dicom_root: Path) -> dict[str, str]:
    # the records name the DICOM root, a temporary folder that differs between sessions
    def content(path: Path) -> bytes:
        data = path.read_bytes()
        return data.replace(str(dicom_root).encode(), b"<dicom_root>") if path.suffix in (".json", ".csv") else data

    return {
        path.relative_to(root).as_posix(): hashlib.sha256(content(path)).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_preprocessing_outputs_are_byte_identical_to_the_record(clean_run, clean_cohort):
    found = _checksums(clean_run, clean_cohort)
    if os.environ.get("CAR_MED_RECORD_CHECKSUMS") == "1":
        RECORD.write_text("".join(f"{digest}  {name}\n" for name, digest in found.items()))
    recorded = dict(line.split("  ", 1)[::-1] for line in RECORD.read_text().splitlines())
    assert len(recorded) > 50  # every crop, mask and record of the six patients
    assert sorted(found) == sorted(recorded), "the run wrote other files than recorded"
    changed = [name for name in recorded if found[name] != recorded[name]]
    assert not changed, f"{len(changed)} output file(s) differ from the record, e.g. {changed[:5]}"
