"""The LIDC-IDRI download's folder layout: one ``LIDC-IDRI-dddd`` folder per patient."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["PATIENT_DIR_PATTERN", "find_patient_dirs"]

PATIENT_DIR_PATTERN = re.compile(r"^LIDC-IDRI-\d{4}$")
"""TCIA names each patient folder after its PatientID."""


def find_patient_dirs(dicom_root: str | os.PathLike) -> dict[str, Path]:
    """Map patient ids to their folders under ``dicom_root``.

    A patient folder is named ``LIDC-IDRI-dddd``. It may sit directly under the root (TCIA's layout) or one
    level deeper (the NBIA downloader's ``LIDC-IDRI/LIDC-IDRI-dddd``).

    Raises:
        FileNotFoundError: the root does not exist.
        ValueError: a patient id appears in two folders.
    """
    root = Path(dicom_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--dicom-root {str(root)!r} is not a directory.")
    found: dict[str, Path] = {}
    candidates = [p for p in root.iterdir() if p.is_dir()]
    for child in sorted(candidates):
        grandchildren = [child] if PATIENT_DIR_PATTERN.match(child.name) else sorted(child.iterdir())
        for folder in grandchildren:
            if folder.is_dir() and PATIENT_DIR_PATTERN.match(folder.name):
                if folder.name in found:
                    raise ValueError(f"patient {folder.name} has two folders: {found[folder.name]} and {folder}.")
                found[folder.name] = folder
    return dict(sorted(found.items()))
