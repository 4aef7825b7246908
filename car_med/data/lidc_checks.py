"""Check an LIDC dataset folder before training starts, so bad input fails in seconds, not hours in.

:func:`load_lidc_datalist` already checks the datalist's fields and that every file exists. This module adds
what only the files themselves can tell: each image has the crop size the transforms expect, each mask has
the image's shape and holds only 0 and 1. Every item of every requested split is checked and all problems
are reported together, each naming the split, the item and the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from car_med.data.lidc import load_lidc_datalist

__all__ = ["LIDCDatasetError", "check_lidc_dataset", "how_to_make_lidc_data"]

DATALIST_NAME = "datalist.json"
_MAX_LISTED = 20


class LIDCDatasetError(ValueError):
    """The LIDC dataset folder is missing, empty or holds an item the training cannot use."""


def how_to_make_lidc_data(dataset_dir: str | os.PathLike) -> str:
    """The commands that write an LIDC dataset folder, as a message for a user who has none."""
    return (
        "Make it with one of:\n"
        f"  python -m preprocessing.lidc --dicom-root <LIDC-IDRI DICOM folder> --output-dir {dataset_dir}\n"
        f"  python -m car_med.data.lidc_releases png <DeepMind PNG release folder> --output-dir {dataset_dir}\n"
        f"  python -m car_med.data.lidc_releases pickle <Prob. U-Net/PHiSeg .pickle> --output-dir {dataset_dir}\n"
        "or, to try the pipeline without LIDC, a synthetic DICOM cohort of real DB scans:\n"
        "  python -m preprocessing.synthetic_lidc --output-dir <DICOM folder> --num-patients 6\n"
        "(docs/lidc.md explains each)."
    )


def _datalist_path(dataset_dir: str | os.PathLike) -> Path:
    folder = Path(dataset_dir)
    if not str(dataset_dir):
        raise LIDCDatasetError(
            "dataset_dir is empty: pass --dataset_dir <folder with datalist.json>.\n"
            + how_to_make_lidc_data("<folder>")
        )
    if not folder.is_dir():
        raise LIDCDatasetError(f"dataset_dir {str(folder)!r} does not exist.\n" + how_to_make_lidc_data(folder))
    datalist = folder / DATALIST_NAME
    if not datalist.is_file():
        entries = sorted(p.name for p in folder.iterdir())[:5]
        what = (
            "is empty"
            if not entries
            else f"has no {DATALIST_NAME} (it holds {entries}{' ...' if len(entries) == 5 else ''})"
        )
        raise LIDCDatasetError(f"dataset_dir {str(folder)!r} {what}.\n" + how_to_make_lidc_data(folder))
    return datalist


def _item_name(split: str, index: int, item: dict) -> str:
    return (
        f"{split} item {index} (patient_id={item.get('patient_id')!r}, nodule_id={item.get('nodule_id')!r}, "
        f"slice_z={item.get('slice_z')!r})"
    )


def _check_item(
    split: str, index: int, item: dict, expected: dict, min_size: tuple[int, int], check_values: bool
) -> list[str]:
    """Problems of one item; ``expected["size"]`` is the crop size, set from the first item when not given."""
    name = _item_name(split, index, item)
    problems = []
    try:
        image = nib.load(item["image"])
    except Exception as err:  # nibabel raises several types for unreadable files
        return [f"{name}: image {item['image']!r} is not a readable NIfTI file ({err})."]
    shape = tuple(int(s) for s in image.shape)
    in_plane = shape[:2]
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 1):
        problems.append(f"{name}: image {item['image']!r} has shape {shape}; expected one slice, (H, W, 1).")
    elif in_plane[0] < min_size[0] or in_plane[1] < min_size[1]:
        problems.append(
            f"{name}: image {item['image']!r} is {in_plane[0]}x{in_plane[1]}, smaller than the "
            f"{min_size[0]}x{min_size[1]} training crop."
        )
    else:
        if "size" not in expected:
            expected.update(size=in_plane, source=name)
        size = expected["size"]
        if in_plane != size:
            problems.append(
                f"{name}: image {item['image']!r} is {in_plane[0]}x{in_plane[1]}; expected {size[0]}x{size[1]} "
                f"like {expected.get('source', 'crop_size')} (all crops of a dataset must have one size)."
            )
    if check_values and not problems:
        pixels = np.asarray(image.dataobj)
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            kind = "NaN" if np.isnan(pixels).any() else "Inf"
            problems.append(
                f"{name}: image {item['image']!r} holds {kind} values; every pixel must be a finite HU value."
            )
    for k, path in enumerate(item["label"]):
        try:
            mask = nib.load(path)
        except Exception as err:
            problems.append(f"{name}: label[{k}] {path!r} is not a readable NIfTI file ({err}).")
            continue
        if tuple(int(s) for s in mask.shape) != shape:
            problems.append(f"{name}: label[{k}] {path!r} has shape {tuple(mask.shape)}, the image {shape}.")
            continue
        if check_values:
            values = np.unique(np.asarray(mask.dataobj))
            bad = values[~np.isin(values, (0, 1))]
            if bad.size:
                shown = ", ".join(f"{v:g}" for v in bad[:5])
                problems.append(
                    f"{name}: label[{k}] {path!r} holds values other than 0 and 1 "
                    f"({shown}{' ...' if bad.size > 5 else ''}); "
                    "masks must be binary (0 = background, 1 = lesion)."
                )
    return problems


def check_lidc_dataset(
    dataset_dir: str | os.PathLike,
    splits: Sequence[str] = ("training", "validation"),
    crop_size: Sequence[int] | None = None,
    min_size: Sequence[int] = (128, 128),
    check_values: bool = True,
    progress: bool = True,
) -> str:
    """Check an LIDC dataset folder and return the path of its ``datalist.json``.

    Args:
        dataset_dir: the folder ``preprocessing.lidc`` or ``car_med.data.lidc_releases`` wrote.
        splits: the splits that must exist, be non-empty and hold usable items.
        crop_size: the in-plane size every image must have (180x180 for the DICOM and PNG crops, 128x128 for
            the pickle release); ``None`` takes the first item's size, so mixed sizes are still caught.
        min_size: the smallest usable size: the training crop (the transforms never pad).
        check_values: read every file: masks must hold only 0 and 1, float images only finite values (about a
            millisecond per file).
        progress: show a progress bar.

    Raises:
        LIDCDatasetError: the folder or its datalist is missing, a split is empty, or items are bad. The
            message lists every bad item (the first 20) with its file and what was expected.
    """
    from tqdm.auto import tqdm

    datalist = _datalist_path(dataset_dir)
    expected: dict = {} if crop_size is None else {"size": tuple(int(s) for s in crop_size), "source": "crop_size"}
    minimum = (int(min_size[0]), int(min_size[1]))
    problems: list[str] = []
    for split in splits:
        try:
            items = load_lidc_datalist(datalist, split, check_files=True)
        except ValueError as err:
            raise LIDCDatasetError(str(err)) from None
        if not items:
            raise LIDCDatasetError(
                f"{str(datalist)!r} split {split!r} has no items.\n" + how_to_make_lidc_data(dataset_dir)
            )
        for index, item in enumerate(tqdm(items, desc=f"checking {split}", disable=not progress, leave=False)):
            problems.extend(_check_item(split, index, item, expected, minimum, check_values))
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise LIDCDatasetError(f"{len(problems)} problem(s) in {str(datalist)!r}:\n  {listed}{more}")
    return str(datalist)
