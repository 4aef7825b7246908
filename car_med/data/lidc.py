"""MONAI datasets and transforms for LIDC-IDRI 2D nodule crops.

The input is a decathlon-style ``datalist.json`` written either by ``preprocessing/lidc.py`` (HU crops from
the raw DICOM) or by :mod:`car_med.data.lidc_releases` (the public DeepMind PNG and Prob. U-Net pickle
releases). Each item names one image NIfTI of shape ``(H, W, 1)`` and a list of annotator masks of the same
shape, stored in the scanner frame so the affine can travel with the pixels as MONAI ``MetaTensor`` meta.

After :func:`lidc_transforms` an item holds ``image`` ``(1, 128, 128)`` float in [0, 1] and ``label``
``(R, 128, 128)`` (evaluation, all readers) or ``(1, 128, 128)`` (training, one reader drawn per item and
per step by :class:`RandAnnotatord`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset
from monai.transforms import (
    CastToTyped,
    CenterSpatialCropd,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    MapTransform,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityRange,
    SqueezeDimd,
)

from car_med.data.annotators import ANNOTATOR_CHOICES, RandAnnotatord, ReaderSharesd
from car_med.data.datalist import check_item_fields, datalist_dataset, read_datalist_split, resolve_item_path

__all__ = [
    "ANNOTATOR_CHOICES",
    "DEFAULT_HU_WINDOW",
    "INTENSITY_KINDS",
    "NUM_ANNOTATORS",
    "RandAnnotatord",
    "ReaderSharesd",
    "ScaleLIDCIntensityd",
    "lidc_dataset",
    "lidc_transforms",
    "load_lidc_datalist",
]

NUM_ANNOTATORS = 4
"""LIDC has at most four readers per scan; every crop carries one mask per reader slot."""

DEFAULT_HU_WINDOW = (-1024.0, 400.0)
"""Air to dense soft tissue/bone edge: covers lung parenchyma and nodules, clips metal and cortical bone."""

INTENSITY_KINDS = ("hu", "uint8", "unit")
"""How an item's image intensities are stored: CT Hounsfield units, 8-bit display values, or floats in [0, 1]."""


_REQUIRED_FIELDS = (
    "image",
    "label",
    "patient_id",
    "series_uid",
    "nodule_id",
    "annotation_ids",
    "slice_z",
    "num_annotators",
)


def _is_int(value: Any) -> bool:
    # bool is an int subclass; a True reader count is a bug in the writer, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or isinstance(value, np.floating)


def _validate_item(index: int, item: Any, base: Path, where_prefix: str, num_labels: int, check_files: bool) -> dict:
    where = check_item_fields(item, index, where_prefix, _REQUIRED_FIELDS, ("patient_id", "nodule_id", "slice_z"))
    out = dict(item)

    labels = item["label"]
    if not isinstance(labels, (list, tuple)) or len(labels) != num_labels:
        got = f"{len(labels)} entries" if isinstance(labels, (list, tuple)) else repr(labels)
        raise ValueError(f"{where} field 'label': expected a list of {num_labels} mask paths, got {got}.")
    out["image"] = resolve_item_path(item["image"], base, where, "image", check_files)
    out["label"] = [resolve_item_path(p, base, where, f"label[{k}]", check_files) for k, p in enumerate(labels)]

    for field in ("patient_id", "series_uid"):
        if not isinstance(item[field], str):
            raise ValueError(f"{where} field '{field}': expected a string, got {item[field]!r}.")
    if not item["patient_id"]:
        raise ValueError(f"{where} field 'patient_id': must not be empty (splits and metrics group by patient).")
    if not isinstance(item["nodule_id"], str) and not _is_int(item["nodule_id"]):
        raise ValueError(f"{where} field 'nodule_id': expected a string or an integer, got {item['nodule_id']!r}.")
    if not isinstance(item["annotation_ids"], list):
        raise ValueError(f"{where} field 'annotation_ids': expected a list, got {item['annotation_ids']!r}.")

    slice_z = item["slice_z"]
    if slice_z is None:
        # The pickle release has no slice position; NaN keeps the field collatable in a batch.
        out["slice_z"] = math.nan
    elif _is_number(slice_z) and math.isfinite(float(slice_z)):
        out["slice_z"] = float(slice_z)
    else:
        raise ValueError(f"{where} field 'slice_z': expected a finite number in mm or null, got {slice_z!r}.")

    count = item["num_annotators"]
    if not _is_int(count) or count < 0:
        raise ValueError(f"{where} field 'num_annotators': expected a non-negative integer, got {count!r}.")

    intensity = item.get("intensity", "hu")
    if intensity not in INTENSITY_KINDS:
        raise ValueError(f"{where} field 'intensity': expected one of {INTENSITY_KINDS}, got {intensity!r}.")
    out["intensity"] = intensity

    if "annotator_present" in item:
        present = item["annotator_present"]
        if (
            not isinstance(present, list)
            or len(present) != num_labels
            or not all(isinstance(flag, bool) for flag in present)
        ):
            raise ValueError(
                f"{where} field 'annotator_present': expected a list of {num_labels} booleans, got {present!r}."
            )
    else:
        # preprocessing/lidc.py orders masks by annotation id and appends empty masks for missing readers,
        # so the first num_annotators slots are the readers that exist.
        out["annotator_present"] = [slot < count for slot in range(num_labels)]
    return out


def load_lidc_datalist(
    path: str | os.PathLike,
    split: str = "training",
    *,
    num_labels: int = NUM_ANNOTATORS,
    check_files: bool = True,
) -> list[dict]:
    """Read one split of an LIDC ``datalist.json``, validate every item and resolve its paths.

    Args:
        path: the ``datalist.json``; relative ``image``/``label`` paths are taken relative to its folder.
        split: ``"training"``, ``"validation"`` or ``"test"`` (``"train"``/``"val"`` are accepted too).
        num_labels: the number of mask paths each item must list (one per reader slot).
        check_files: also check that every referenced file exists.

    Returns:
        The split's items as new dicts with absolute paths, ``slice_z`` as a float (NaN where the datalist
        has ``null``), ``intensity`` filled in (``"hu"`` when absent) and ``annotator_present``, a list of
        ``num_labels`` booleans. When the datalist does not give ``annotator_present``, the first
        ``num_annotators`` slots are taken as present, which is how ``preprocessing/lidc.py`` orders them.

    Raises:
        ValueError: the file is not a datalist, the split is missing, or an item is malformed; the message
            names the file, the item and the field.
    """
    items, where_prefix, base = read_datalist_split(path, split, "LIDC")
    return [_validate_item(i, item, base, where_prefix, num_labels, check_files) for i, item in enumerate(items)]


class ScaleLIDCIntensityd(MapTransform):
    """Map an item's image to [0, 1] according to how that item stores its intensities.

    Each item says how its image is stored in its ``intensity`` field (see :data:`INTENSITY_KINDS`):

    - ``"hu"``: Hounsfield units, windowed linearly so ``hu_window[0]`` -> 0 and ``hu_window[1]`` -> 1.
      The default window [-1024, 400] spans air to the densest soft tissue, so lung and nodules keep their
      contrast while bone and metal saturate.
    - ``"uint8"``: 8-bit values (the DeepMind PNG release, already windowed by its authors): divided by 255.
    - ``"unit"``: already in [0, 1] (the Prob. U-Net/PHiSeg pickle release): left as is.

    With ``clip=True`` (default) values outside the source range are clipped, so the output is always in
    [0, 1]. All three mappings use MONAI's ``ScaleIntensityRange``.

    Args:
        keys: image keys to scale.
        intensity_key: the item field naming the storage kind.
        hu_window: ``(low, high)`` HU window for ``"hu"`` items.
        clip: clip to [0, 1] after scaling.
        default_intensity: the kind assumed for items without ``intensity_key`` (the DICOM preprocessing
            output writes HU and does not set the field).
        allow_missing_keys: as in MONAI ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        intensity_key: str = "intensity",
        hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
        clip: bool = True,
        default_intensity: str = "hu",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        low, high = (float(v) for v in hu_window)
        if not low < high:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {tuple(hu_window)}.")
        if default_intensity not in INTENSITY_KINDS:
            raise ValueError(f"default_intensity must be one of {INTENSITY_KINDS}, got {default_intensity!r}.")
        self.intensity_key = intensity_key
        self.default_intensity = default_intensity
        self.scalers = {
            kind: ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=clip)
            for kind, (a_min, a_max) in {"hu": (low, high), "uint8": (0.0, 255.0), "unit": (0.0, 1.0)}.items()
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        kind = d.get(self.intensity_key, self.default_intensity)
        if kind not in self.scalers:
            raise ValueError(
                f"field '{self.intensity_key}' of item (patient_id={d.get('patient_id')!r}) must be one of "
                f"{INTENSITY_KINDS}, got {kind!r}."
            )
        for key in self.key_iterator(d):
            d[key] = self.scalers[kind](d[key])
        return d


def lidc_transforms(
    mode: str = "train",
    *,
    image_key: str = "image",
    label_key: str = "label",
    roi_size: Sequence[int] = (128, 128),
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    clip: bool = True,
    annotator_choice: str = "all",
    label_dtype: torch.dtype | str = torch.uint8,
    reader: str = "NibabelReader",
    augment: bool = False,
    shares_key: str | None = None,
) -> Compose:
    """The MONAI transform chain from a validated datalist item to network-ready tensors.

    Steps: load the image and the stacked reader masks (``LoadImaged``, which stacks the list of mask files
    on dim 0), channel first, drop the singleton slice axis, centre-crop to ``roi_size`` (180 -> 128, as the
    authors' loaders do), scale intensities to [0, 1] (:class:`ScaleLIDCIntensityd`), cast the masks, and
    make list metadata collatable. In ``"train"`` mode :class:`RandAnnotatord` then keeps one reader.

    The slice axis is dropped with ``update_meta=False`` so the image keeps its 4x4 scanner-frame affine:
    MONAI derives the spatial rank from the affine, so the crop shifts that affine correctly, and export can
    write ``(H, W, 1)`` back in the scanner frame. Crops smaller than ``roi_size`` are left smaller (MONAI
    ``CenterSpatialCrop`` semantics), never padded.

    ``annotation_ids`` (a list whose length varies between items) becomes a JSON string and
    ``annotator_present`` a bool tensor, so that the default collate can batch items.

    Args:
        mode: ``"train"`` (one random reader: label ``(1, H, W)``) or ``"eval"`` (all readers: ``(R, H, W)``).
        image_key: the image key.
        label_key: the stacked label key.
        roi_size: centre crop size ``(H, W)``.
        hu_window: HU window for ``"hu"`` items, mapped to [0, 1].
        clip: clip scaled intensities to [0, 1].
        annotator_choice: ``among`` of :class:`RandAnnotatord` (train mode only).
        label_dtype: dtype of the masks; integers keep a cached dataset small.
        reader: MONAI image reader; nibabel keeps the NIfTI's RAS affine and axis order as written.
        augment: ``"train"`` only: after the reader draw, flip each axis with probability 0.5 and rotate by a
            random multiple of 90 degrees, the image and its mask together (MONAI ``RandFlipd``,
            ``RandRotate90d``). These keep every pixel's value and its reader agreement, so F sees the 8
            orientations of each nodule; on the 16 training patients of the demo it brings F's test error
            inside the nodules from 0.22 to 0.20 after 400 iterations (docs/lidc.md, section 11). Off by
            default, as in the paper.
        shares_key: ``"train"`` only: also write the readers' class shares ``(2, H, W)`` under this key
            (:class:`ReaderSharesd`, over the same slots as ``annotator_choice``), before the reader draw and
            turned with the image by ``augment``. F's stage-1 loss can take them instead of one reader
            (bundle key ``f_target: "readers_mean"``). ``None`` (default) writes nothing.

    Returns:
        A MONAI ``Compose``; everything before the random annotator draw is deterministic, so a
        ``CacheDataset`` caches the loaded, cropped and scaled tensors.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}.")
    if len(roi_size) != 2:
        raise ValueError(f"roi_size must be (H, W) for 2D crops, got {tuple(roi_size)}.")
    keys = [image_key, label_key]
    transforms = _load_crop_scale_steps(
        keys, roi_size=roi_size, hu_window=hu_window, clip=clip, label_dtype=label_dtype, reader=reader
    )
    _check_train_options(mode, keys, roi_size=roi_size, augment=augment, shares_key=shares_key)
    transforms += _reader_steps(mode, keys, annotator_choice=annotator_choice, augment=augment, shares_key=shares_key)
    return Compose(transforms)


def _load_crop_scale_steps(
    keys: list[str],
    *,
    roi_size: Sequence[int],
    hu_window: Sequence[float],
    clip: bool,
    label_dtype: torch.dtype | str,
    reader: str,
) -> list:
    """The deterministic steps of :func:`lidc_transforms`: load, channel first, drop the slice axis, crop, scale,
    cast the masks and make list metadata collatable. ``keys`` is ``[image key, label key]``."""
    image_key, label_key = keys
    return [
        LoadImaged(keys, reader=reader, image_only=True),
        EnsureChannelFirstd(keys),
        SqueezeDimd(keys, dim=-1, update_meta=False),
        CenterSpatialCropd(keys, roi_size=tuple(int(s) for s in roi_size)),
        ScaleLIDCIntensityd(image_key, hu_window=hu_window, clip=clip),
        CastToTyped(label_key, dtype=label_dtype),
        Lambdad("annotation_ids", json.dumps, allow_missing_keys=True),
        EnsureTyped(
            "annotator_present", data_type="tensor", dtype=torch.bool, track_meta=False, allow_missing_keys=True
        ),
    ]


def _check_train_options(
    mode: str, keys: list[str], *, roi_size: Sequence[int], augment: bool, shares_key: str | None
) -> None:
    """Refuse ``augment`` and ``shares_key`` outside training, a non-square crop to turn, a clashing shares key."""
    if augment and mode != "train":
        raise ValueError("augment=True applies to mode='train' only: evaluation sees the crops as they are.")
    if augment and roi_size[0] != roi_size[1]:
        raise ValueError(f"augment=True turns crops by 90 degrees, so roi_size must be square, got {tuple(roi_size)}.")
    if shares_key is not None and mode != "train":
        raise ValueError("shares_key applies to mode='train' only: evaluation keeps every reader's mask.")
    if shares_key in keys:
        raise ValueError(f"shares_key must differ from the image and label keys, got {shares_key!r}.")


def _reader_steps(mode: str, keys: list[str], *, annotator_choice: str, augment: bool, shares_key: str | None) -> list:
    """The training steps of :func:`lidc_transforms`: the readers' shares, the reader draw, the flips and turns."""
    label_key = keys[1]
    steps: list = []
    if shares_key is not None:
        steps.append(ReaderSharesd(label_key, shares_key, num_classes=2, among=annotator_choice))
    if mode == "train":
        steps.append(RandAnnotatord(label_key, among=annotator_choice))
    if augment:
        turned = keys if shares_key is None else [*keys, shares_key]
        steps += [
            RandFlipd(turned, prob=0.5, spatial_axis=0),
            RandFlipd(turned, prob=0.5, spatial_axis=1),
            RandRotate90d(turned, prob=0.5, max_k=3),
        ]
    return steps


def lidc_dataset(
    datalist: str | os.PathLike | Sequence[Mapping],
    split: str = "training",
    mode: str = "train",
    cache: bool = False,
    *,
    cache_rate: float = 1.0,
    cache_num_workers: int = 1,
    transform: Any = None,
    check_files: bool = True,
    **transform_kwargs: Any,
) -> Dataset:
    """A MONAI ``Dataset`` (or ``CacheDataset``) over one split of an LIDC datalist.

    Args:
        datalist: path of ``datalist.json``, or items already returned by :func:`load_lidc_datalist`.
        split: the split to read when ``datalist`` is a path.
        mode: ``"train"`` or ``"eval"`` (see :func:`lidc_transforms`).
        cache: use a ``CacheDataset``; it caches everything up to the random reader draw, so each cached
            training item costs about ``R * 128 * 128`` bytes of masks plus ``4 * 128 * 128`` of image.
        cache_rate: fraction of items to cache.
        cache_num_workers: threads that fill the cache.
        transform: a transform to use instead of :func:`lidc_transforms`.
        check_files: check that the referenced files exist when reading the datalist.
        transform_kwargs: passed to :func:`lidc_transforms` (``roi_size``, ``hu_window``, ``clip``,
            ``annotator_choice``, ``label_dtype``, ...).
    """
    return datalist_dataset(
        datalist,
        partial(load_lidc_datalist, split=split, check_files=check_files),
        transform,
        partial(lidc_transforms, mode),
        transform_kwargs,
        cache,
        cache_rate=cache_rate,
        num_workers=cache_num_workers,
    )
