"""Reading one split of a MONAI-style ``datalist.json``: the checks every dataset's loader shares."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from car_med.data.splits import SPLIT_NAMES

__all__ = ["SPLIT_ALIASES", "read_datalist_split", "resolve_item_path"]

SPLIT_ALIASES = {"train": "training", "val": "validation", "valid": "validation", "test": "test"}
"""Short split names users type, and the datalist key each means."""


def read_datalist_split(
    path: str | os.PathLike, split: str, kind: str, how_to_make: str = ""
) -> tuple[list, str, Path]:
    """The raw items of one split, a ``where`` prefix for error messages, and the folder paths are relative to.

    Args:
        path: the ``datalist.json``.
        split: a split name or one of :data:`SPLIT_ALIASES`.
        kind: the dataset's name in messages, e.g. ``"LIDC"``.
        how_to_make: appended to the message for a missing file, e.g. ``"; make it with ..."``.

    Raises:
        ValueError: the file is missing, is not JSON, is not an object of splits, lacks the split, or the split
            is not a list; the message names the file and the split.
    """
    path = Path(path)
    name = f"{kind} datalist {str(path)!r}"
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{name} does not exist{how_to_make}.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not valid JSON: {err}.") from None
    if not isinstance(content, Mapping):
        raise ValueError(f"{name}: expected a JSON object with split keys, got {type(content).__name__}.")
    key = SPLIT_ALIASES.get(split, split)
    if key not in content:
        splits = [k for k in SPLIT_NAMES if k in content]
        raise ValueError(f"{name} has no split {split!r}; it has {splits}.")
    items = content[key]
    if not isinstance(items, list):
        raise ValueError(f"{name} split {key!r}: expected a list of items, got {type(items).__name__}.")
    return items, f"{name} split {key!r}", path.parent.resolve()


def resolve_item_path(value: Any, base: Path, where: str, field: str, check_files: bool) -> str:
    """An item's path field as an absolute path (relative ones are taken from ``base``), checked if asked.

    Raises:
        ValueError: not a non-empty string, or (with ``check_files``) no such file; names ``where`` and ``field``.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} field '{field}': expected a non-empty path string, got {value!r}.")
    resolved = Path(value)
    if not resolved.is_absolute():
        resolved = base / resolved
    if check_files and not resolved.is_file():
        raise ValueError(f"{where} field '{field}': file {str(resolved)!r} does not exist.")
    return os.fspath(resolved)
