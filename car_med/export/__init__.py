"""Radiologist review export: CAR sample sets as NIfTI in the scanner frame, CT overlays, DICOM SEG, a queue page.

Run it as ``python -m car_med.export --model MODEL --datalist DATALIST --output-dir EXP`` (see
:mod:`car_med.export.__main__`) or as ``bundles/lidc/export.json``; docs/review.md shows what it writes.
"""

from __future__ import annotations

from car_med.ct.volume import CTSeries, paste_plane, read_ct_series
from car_med.export.files import safe_path_part
from car_med.export.model_source import ModelSource, load_export_model, resolve_model_source
from car_med.export.run import ExportOptions, ExportSummary, export_cases, export_items, raise_if_failed

__all__ = [
    "CTSeries",
    "ExportOptions",
    "ExportSummary",
    "ModelSource",
    "export_cases",
    "export_items",
    "load_export_model",
    "paste_plane",
    "raise_if_failed",
    "read_ct_series",
    "resolve_model_source",
    "safe_path_part",
]
