"""Reading one split of a MONAI-style ``datalist.json``: the checks every dataset's loader shares."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset

from car_med.data.splits import SPLIT_NAMES

__all__ = ["SPLIT_ALIASES", "check_item_fields", "datalist_dataset", "read_datalist_split", "resolve_item_path"]

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


def check_item_fields(
    item: Any, index: int, where_prefix: str, required: Sequence[str], name_fields: Sequence[str], hint: str = ""
) -> str:
    """Check that a datalist item is a dict with every ``required`` field; give its ``where`` for later messages.

    Args:
        item: the raw item.
        index: its position in the split.
        where_prefix: the split's prefix from :func:`read_datalist_split`.
        required: the fields every item must have.
        name_fields: fields that name the item in messages (e.g. ``patient_id``), shown where present.
        hint: appended to the missing-field message, e.g. how to make the data again.

    Raises:
        ValueError: not a dict, or fields are missing; names the file, the split, the item and the fields.
    """
    if not isinstance(item, Mapping):
        raise ValueError(f"{where_prefix} item {index}: expected a dict, got {type(item).__name__}.")
    who = ", ".join(f"{field}={item[field]!r}" for field in name_fields if field in item)
    where = f"{where_prefix} item {index}" + (f" ({who})" if who else "")
    missing = [field for field in required if field not in item]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}; required fields are {list(required)}{hint}.")
    return where


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


def datalist_dataset(
    datalist: str | os.PathLike | Sequence[Mapping],
    read_split: Callable[[str | os.PathLike], list[dict]],
    transform: Callable | None,
    default_transform: Callable[..., Callable],
    transform_kwargs: Mapping[str, Any],
    cache: bool,
    **cache_options: Any,
) -> Dataset:
    """The dataset builder behind ``lidc_dataset`` and ``cityscapes_dataset``: items in, MONAI dataset out.

    Args:
        datalist: a ``datalist.json`` path (read with ``read_split``), or items already read (copied).
        read_split: the dataset's validating loader, bound to its split and options.
        transform: the transform to use; ``None`` builds ``default_transform(**transform_kwargs)``.
        default_transform: the dataset's transform chain factory, bound to its mode.
        transform_kwargs: the caller's keyword arguments for ``default_transform``.
        cache: a ``CacheDataset`` (``cache_options`` go to it) instead of a ``Dataset``.

    Raises:
        ValueError: ``transform_kwargs`` were given together with a ``transform`` (they would be ignored).
    """
    if isinstance(datalist, (str, os.PathLike)):
        items = read_split(datalist)
    else:
        items = [dict(item) for item in datalist]
    if transform is None:
        transform = default_transform(**transform_kwargs)
    elif transform_kwargs:
        raise ValueError(f"transform_kwargs {sorted(transform_kwargs)} are ignored when a transform is given.")
    if cache:
        return CacheDataset(items, transform, progress=False, **cache_options)
    return Dataset(items, transform)
