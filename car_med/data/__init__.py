"""Datasets, transforms and release converters.

Public names are resolved lazily (PEP 562) so that ``import car_med.data`` stays cheap: torch and MONAI
are imported only when a name from a submodule is first used. Add a submodule's names to ``_LAZY``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # car_med.data.ambiguous_tail
    "AmbiguousTailDataset": "ambiguous_tail",
    "tail_mode_statistics": "ambiguous_tail",
    # car_med.data.cityscapes
    "RandStochasticClassFlipd": "cityscapes",
    "StochasticLabelModesd": "cityscapes",
    "cityscapes_dataset": "cityscapes",
    "cityscapes_label_modes": "cityscapes",
    "cityscapes_transforms": "cityscapes",
    "load_cityscapes_datalist": "cityscapes",
    # car_med.data.cityscapes_layout
    "CITYSCAPES_CLASS_NAMES": "cityscapes_layout",
    "CITYSCAPES_HOLDOUT_CITIES": "cityscapes_layout",
    "CITYSCAPES_IGNORE_CLASS": "cityscapes_layout",
    "CITYSCAPES_NUM_CLASSES": "cityscapes_layout",
    "CITYSCAPES_NUM_TRAIN_IDS": "cityscapes_layout",
    "LABEL_ID_TO_TRAIN_ID": "cityscapes_layout",
    "label_ids_to_train_ids": "cityscapes_layout",
    # car_med.data.lidc
    # car_med.data.annotators
    "ANNOTATOR_CHOICES": "annotators",
    "RandAnnotatord": "annotators",
    "ReaderSharesd": "annotators",
    "annotator_candidates": "annotators",
    # car_med.data.datalist
    "SPLIT_ALIASES": "datalist",
    "read_datalist_split": "datalist",
    "resolve_item_path": "datalist",
    # car_med.data.lidc
    "DEFAULT_HU_WINDOW": "lidc",
    "INTENSITY_KINDS": "lidc",
    "NUM_ANNOTATORS": "lidc",
    "ScaleLIDCIntensityd": "lidc",
    "lidc_dataset": "lidc",
    "lidc_transforms": "lidc",
    "load_lidc_datalist": "lidc",
    # car_med.data.lidc_checks
    "LIDCDatasetError": "lidc_checks",
    "check_lidc_dataset": "lidc_checks",
    "how_to_make_lidc_data": "lidc_checks",
    # car_med.data.lidc_releases
    "convert_pickle_release": "lidc_releases",
    "convert_png_release": "lidc_releases",
    "load_release_pickle": "lidc_releases",
    "parse_png_name": "lidc_releases",
    # car_med.data.stochastic_classes
    "CITYSCAPES_IGNORE_INDEX": "stochastic_classes",
    "CITYSCAPES_STOCHASTIC_CLASSES": "stochastic_classes",
    "CITYSCAPES_SWITCHABLE_CLASSES": "stochastic_classes",
    "check_stochastic_classes": "stochastic_classes",
    "stochastic_label_modes": "stochastic_classes",
    "stochastic_mode_flips": "stochastic_classes",
    "stochastic_mode_weights": "stochastic_classes",
    # car_med.data.splits
    "split_patients": "splits",
    "SPLIT_NAMES": "splits",
    # car_med.data.toy
    "ToyBatchDataset": "toy",
    "sample_toy": "toy",
    "toy_expected_y": "toy",
    "toy_log_likelihood": "toy",
    "toy_mode_means": "toy",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
