"""MONAI datasets and transforms for the stochastic Cityscapes protocol (SPEC 3.2).

The input is the ``datalist.json`` written by ``preprocessing/cityscapes.py``: per image a 256x512 RGB PNG, a
label PNG with trainIds 0..18 and ignore 24, and optionally a black-box prediction PNG with trainIds 0..18.

The five stochastic classes (:data:`~car_med.data.stochastic_classes.CITYSCAPES_STOCHASTIC_CLASSES`) are
flipped on the fly: :class:`RandStochasticClassFlipd` draws, per image and per call, one Bernoulli per class and
relabels *every* pixel of a drawn class (sidewalk 1 -> 19 with 8/17, person 11 -> 20 with 7/17, car 13 -> 21 with
6/17, vegetation 8 -> 22 with 5/17, road 0 -> 23 with 4/17). For evaluation the ground truth is the full set of
``2**5 = 32`` modes with analytic probabilities (:func:`cityscapes_label_modes`, :class:`StochasticLabelModesd`).

After :func:`cityscapes_transforms` an item holds ``image`` ``(3, H, W)`` float in [0, 1], ``label`` ``(1, H, W)``
(flipped in ``"train"`` mode) and, when the datalist has it, ``blackbox`` ``(19, H, W)`` one-hot float.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset, PILReader
from monai.transforms import (
    AsDiscreted,
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Randomizable,
    Resized,
    ScaleIntensityRanged,
)
from monai.utils import convert_to_tensor

from car_med.data.cityscapes_layout import CITYSCAPES_NUM_TRAIN_IDS
from car_med.data.datalist import check_item_fields, datalist_dataset, read_datalist_split, resolve_item_path
from car_med.data.stochastic_classes import (
    CITYSCAPES_STOCHASTIC_CLASSES,
    check_stochastic_classes,
    stochastic_label_modes,
    stochastic_mode_weights,
)

__all__ = [
    "RandStochasticClassFlipd",
    "StochasticLabelModesd",
    "cityscapes_dataset",
    "cityscapes_label_modes",
    "cityscapes_transforms",
    "load_cityscapes_datalist",
]


_REQUIRED_FIELDS = ("image", "label", "stem", "city", "official_split")


def load_cityscapes_datalist(
    path: str | os.PathLike,
    split: str = "training",
    *,
    require_blackbox: bool = False,
    check_files: bool = True,
) -> list[dict]:
    """Read one split of a Cityscapes ``datalist.json``, validate every item and resolve its paths.

    Args:
        path: the ``datalist.json``; relative paths are taken relative to its folder.
        split: ``"training"``, ``"validation"`` or ``"test"`` (``"train"``/``"val"`` are accepted too).
        require_blackbox: every item must name a ``blackbox`` file (CAR on a black box needs it).
        check_files: also check that every referenced file exists.

    Returns:
        The split's items as new dicts with absolute ``image``, ``label`` and (when present) ``blackbox`` paths.

    Raises:
        ValueError: the file is not a datalist, the split is missing, or an item is malformed; the message
            names the file, the item and the field.
    """
    items, where_prefix, base = read_datalist_split(
        path, split, "Cityscapes", "; make it with python -m preprocessing.cityscapes"
    )
    out = []
    required = (*_REQUIRED_FIELDS, "blackbox") if require_blackbox else _REQUIRED_FIELDS
    hint = "; rerun python -m preprocessing.cityscapes with --blackbox-dir" if require_blackbox else ""
    for index, item in enumerate(items):
        where = check_item_fields(item, index, where_prefix, required, ("stem",), hint)
        entry = dict(item)
        for field in ("image", "label", "blackbox"):
            if field in item:
                entry[field] = resolve_item_path(item[field], base, where, field, check_files)
        out.append(entry)
    return out


class RandStochasticClassFlipd(Randomizable, MapTransform):
    """Flip whole classes of an integer label map, each with its own probability (Kohl et al. 2018; SPEC 3.2).

    Per call, one Bernoulli(``p_k``) is drawn for each ``(base_k, flipped_k, p_k)`` of ``stochastic_classes``;
    when it fires, every pixel of ``base_k`` becomes ``flipped_k``. The draw is made even when the class is
    absent, so the flip decisions (stored under ``flips_key`` as a ``(K,)`` bool tensor) always have the
    protocol's distribution. Pixels of other classes are never changed. All ``keys`` get the same flips.

    Seed it with ``set_random_state`` (or MONAI's ``set_determinism`` / ``Compose.set_random_state``).

    Args:
        keys: integer label keys, e.g. ``(1, H, W)``.
        stochastic_classes: ``(base, flipped, probability)`` triples; the Cityscapes five by default.
        flips_key: where to record the flip decisions; ``None`` records nothing.
        allow_missing_keys: as in MONAI ``MapTransform``.

    Example:
        >>> flip = RandStochasticClassFlipd("label").set_random_state(0)
        >>> out = flip({"label": torch.tensor([[[0, 1, 8, 11, 13, 2]]])})
        >>> out["label_flips"].shape
        torch.Size([5])
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
        flips_key: str | None = "label_flips",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.stochastic_classes = check_stochastic_classes(stochastic_classes)
        self.flips_key = flips_key
        self._probs = np.array([p for _, _, p in self.stochastic_classes], dtype=np.float64)
        self._flips = np.zeros(len(self.stochastic_classes), dtype=bool)

    def randomize(self, data: Any = None) -> None:
        """Draw the ``K`` flip decisions."""
        self._flips = self.R.random_sample(len(self._probs)) < self._probs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            label = d[key]
            if isinstance(label, torch.Tensor) and label.is_floating_point():
                raise ValueError(f"RandStochasticClassFlipd: '{key}' must be an integer label map, got {label.dtype}.")
            out = label.clone() if isinstance(label, torch.Tensor) else np.array(label, copy=True)
            for (base, flipped, _), flip in zip(self.stochastic_classes, self._flips):
                if flip:
                    out[label == base] = flipped
            d[key] = out
        if self.flips_key is not None:
            d[self.flips_key] = torch.as_tensor(self._flips.copy())
        return d


def cityscapes_label_modes(
    label: torch.Tensor | np.ndarray,
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``2**K`` ground-truth modes of integer label maps and their analytic probabilities.

    A thin pairing of :func:`~car_med.data.stochastic_classes.stochastic_label_modes` and
    :func:`~car_med.data.stochastic_classes.stochastic_mode_weights`; the modes are in the order of
    :func:`~car_med.data.stochastic_classes.stochastic_mode_flips`.

    Args:
        label: ``(B, *spatial)`` integer label maps (flipped or not: both give the same modes).
        stochastic_classes: ``(base, flipped, probability)`` triples.

    Returns:
        ``(modes (B, 2**K, *spatial), weights (2**K,) float64 summing to 1)``.
    """
    return stochastic_label_modes(label, stochastic_classes), stochastic_mode_weights(stochastic_classes)


class StochasticLabelModesd(MapTransform):
    """Add the ``2**K`` label modes of a ``(1, *spatial)`` label and their weights to an item (for evaluation).

    Args:
        keys: the label key.
        modes_key: where to put the modes ``(2**K, *spatial)``.
        weights_key: where to put the weights ``(2**K,)``.
        stochastic_classes: ``(base, flipped, probability)`` triples.
        allow_missing_keys: as in MONAI ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        modes_key: str = "label_modes",
        weights_key: str = "label_mode_weights",
        stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modes_key, self.weights_key = modes_key, weights_key
        self.stochastic_classes = check_stochastic_classes(stochastic_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = convert_to_tensor(d[key], track_meta=False)
            if label.ndim < 2 or label.shape[0] != 1:
                raise ValueError(f"StochasticLabelModesd: '{key}' must be (1, *spatial), got {tuple(label.shape)}.")
            modes, weights = cityscapes_label_modes(label, self.stochastic_classes)
            d[self.modes_key], d[self.weights_key] = modes[0], weights
        return d


def cityscapes_transforms(
    mode: str = "train",
    *,
    image_key: str = "image",
    label_key: str = "label",
    blackbox_key: str | None = "blackbox",
    spatial_size: Sequence[int] | None = None,
    flip: bool | None = None,
    label_modes: bool = False,
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
    label_dtype: torch.dtype | str = torch.int64,
) -> Compose:
    """The MONAI transform chain from a validated datalist item to network-ready tensors.

    Steps: load the PNGs (``PILReader`` in ``(H, W)`` order), channel first, optionally resize to
    ``spatial_size`` (image bilinear, label and black box nearest-exact: the source pixel under each
    output pixel's centre), scale the image from 0..255 to [0, 1], cast
    the label, one-hot the black box to :data:`CITYSCAPES_NUM_TRAIN_IDS` channels, and in ``"train"`` mode flip
    the stochastic classes (:class:`RandStochasticClassFlipd`, the only random step, so a ``CacheDataset``
    caches everything before it).

    Args:
        mode: ``"train"`` or ``"eval"``.
        image_key: the image key.
        label_key: the label key.
        blackbox_key: the black-box key; ``None`` (or items without it) skip it.
        spatial_size: ``(H, W)`` to resize to (e.g. ``(64, 128)`` for a CPU demo); ``None`` keeps 256x512.
        flip: apply the class flips; default ``True`` in ``"train"`` mode and ``False`` in ``"eval"``.
        label_modes: add the 32 modes and weights (:class:`StochasticLabelModesd`) for evaluation.
        stochastic_classes: ``(base, flipped, probability)`` triples.
        label_dtype: dtype of the label.

    Returns:
        A MONAI ``Compose``.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}.")
    flip = (mode == "train") if flip is None else bool(flip)
    keys = [image_key, label_key] + ([blackbox_key] if blackbox_key else [])
    transforms: list = [
        LoadImaged(keys, reader=PILReader(reverse_indexing=False), image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys, allow_missing_keys=True),
    ]
    if spatial_size is not None:
        if len(spatial_size) != 2:
            raise ValueError(f"spatial_size must be (H, W), got {tuple(spatial_size)}.")
        size = tuple(int(s) for s in spatial_size)
        transforms.append(
            Resized(
                keys,
                size,
                mode=["bilinear"] + ["nearest-exact"] * (len(keys) - 1),
                anti_aliasing=False,
                allow_missing_keys=True,
            )
        )
    transforms += [
        ScaleIntensityRanged(image_key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        CastToTyped(label_key, dtype=label_dtype),
    ]
    if blackbox_key:
        transforms.append(AsDiscreted(blackbox_key, to_onehot=CITYSCAPES_NUM_TRAIN_IDS, allow_missing_keys=True))
    if flip:
        transforms.append(RandStochasticClassFlipd(label_key, stochastic_classes))
    if label_modes:
        transforms.append(StochasticLabelModesd(label_key, stochastic_classes=stochastic_classes))
    return Compose(transforms)


def cityscapes_dataset(
    datalist: str | os.PathLike | Sequence[Mapping],
    split: str = "training",
    mode: str = "train",
    cache: bool = False,
    *,
    require_blackbox: bool = False,
    transform: Any = None,
    check_files: bool = True,
    **transform_kwargs: Any,
) -> Dataset:
    """A MONAI ``Dataset`` over one split of a Cityscapes datalist, with :func:`cityscapes_transforms`.

    Args:
        datalist: a ``datalist.json`` (read with :func:`load_cityscapes_datalist`) or the items it returned.
        split: which split of a ``datalist.json`` to read.
        mode: ``"train"`` (random class flips) or ``"eval"``.
        cache: a ``CacheDataset``, which holds everything before the random flip.
        require_blackbox: every item must have a black-box prediction.
        transform: replaces :func:`cityscapes_transforms` (then ``transform_kwargs`` must be empty).
        check_files: check that every file the datalist names exists.
        transform_kwargs: for :func:`cityscapes_transforms`.
    """
    return datalist_dataset(
        datalist,
        partial(load_cityscapes_datalist, split=split, require_blackbox=require_blackbox, check_files=check_files),
        transform,
        partial(cityscapes_transforms, mode),
        transform_kwargs,
        cache,
    )
