"""Cityscapes conventions: the official layout and file names, the labelId -> trainId table, the 25-class id space.

Cityscapes ``*_gtFine_labelIds.png`` files store the 34 official label ids (0..33). Training uses the 19
evaluated classes, the trainIds 0..18; every other labelId is "ignore" (trainId 255 in cityscapesScripts). The
stochastic protocol (SPEC 3.2) adds five flipped classes 19..23 and moves ignore to class 24, so labels live in
``0..24``: 25 channels.

File names (``<city>_<seq>_<frame>`` is the official stem, e.g. ``aachen_000000_000019``)::

    leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png     official image (RGB)
    gtFine/<split>/<city>/<stem>_gtFine_labelIds.png      official labelIds (8-bit)
    <PRED>/<split>/<city>/<stem>_blackbox.png             a black-box prediction, trainIds 0..18 (8-bit)

where ``<split>`` is the official split (``train`` or ``val``); :func:`find_images` lists a root's images in
that layout. This module imports only numpy and Pillow so
that the preprocessing CLI starts fast; the flip transform and the label modes are in
:mod:`car_med.data.cityscapes`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from car_med.data.splits import SPLIT_NAMES

__all__ = [
    "BLACKBOX_SUFFIX",
    "IMAGE_SUFFIX",
    "LABEL_SUFFIX",
    "OFFICIAL_SPLITS",
    "STEM_PATTERN",
    "SourceImage",
    "find_images",
    "skip_record",
    "blackbox_relpath",
    "png_bytes",
    "read_png",
    "parse_stem",
    "resize_bilinear",
    "resize_nearest",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_HOLDOUT_CITIES",
    "CITYSCAPES_IGNORE_CLASS",
    "CITYSCAPES_NUM_CLASSES",
    "CITYSCAPES_NUM_TRAIN_IDS",
    "LABEL_ID_TO_TRAIN_ID",
    "label_ids_to_train_ids",
]

#: The official Cityscapes labelId -> trainId table, copied by hand from cityscapesScripts
#: (``cityscapesscripts/helpers/labels.py``, the ``labels`` list: name, id, trainId), with trainId 255
#: ("ignoreInEval") written as ``None``. ``license plate`` (id -1) never appears in a labelIds PNG and is left
#: out. cityscapesScripts is not a dependency of car-med, hence the copy.
LABEL_ID_TO_TRAIN_ID: dict[int, int | None] = {
    0: None,  # unlabeled
    1: None,  # ego vehicle
    2: None,  # rectification border
    3: None,  # out of roi
    4: None,  # static
    5: None,  # dynamic
    6: None,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: None,  # parking
    10: None,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: None,  # guard rail
    15: None,  # bridge
    16: None,  # tunnel
    17: 5,  # pole
    18: None,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: None,  # caravan
    30: None,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}

#: Number of evaluated Cityscapes classes (trainIds 0..18); a black box predicts these.
CITYSCAPES_NUM_TRAIN_IDS = 19

#: The class every ignore labelId maps to in the stochastic protocol (SPEC 3.2).
CITYSCAPES_IGNORE_CLASS = 24

#: Channels of the stochastic protocol: 19 trainIds, 5 flipped classes (19..23) and ignore (24).
CITYSCAPES_NUM_CLASSES = 25

#: Names of the 25 classes, indexed by class id.
CITYSCAPES_CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
    "sidewalk2",
    "person2",
    "car2",
    "vegetation2",
    "road2",
    "ignore",
)

#: Official training cities held out as the validation split (Kohl et al. 2018; SPEC 3.2).
CITYSCAPES_HOLDOUT_CITIES: tuple[str, ...] = ("darmstadt", "monchengladbach", "ulm")

_LOOKUP = np.full(256, 255, dtype=np.uint8)  # 255 marks "not an official labelId"
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
    _LOOKUP[_label_id] = CITYSCAPES_IGNORE_CLASS if _train_id is None else _train_id


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an integer array of official labelIds to the stochastic protocol's ids (trainIds 0..18, ignore 24).

    Args:
        label_ids: integer array of labelIds, any shape.

    Returns:
        A ``uint8`` array of the same shape with values in ``0..18`` and ``24``.

    Raises:
        ValueError: the array is not integer, or holds a value that is not an official labelId (0..33); the
            message lists the unknown values.

    Example:
        >>> label_ids_to_train_ids(np.array([7, 8, 26, 1])).tolist()
        [0, 1, 13, 24]
    """
    array = np.asarray(label_ids)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labelIds must be an integer array, got dtype {array.dtype}.")
    known = (array >= 0) & (array < len(_LOOKUP))
    known[known] = _LOOKUP[array[known]] != 255
    if not known.all():
        unknown = np.unique(array[~known])
        shown = ", ".join(str(int(v)) for v in unknown[:10]) + (", ..." if unknown.size > 10 else "")
        raise ValueError(
            f"unknown Cityscapes labelId(s) {shown} ({int((~known).sum())} pixels); "
            f"expected official labelIds 0..{max(LABEL_ID_TO_TRAIN_ID)} (cityscapesScripts labels.py)."
        )
    return _LOOKUP[array.astype(np.int64)]


IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
BLACKBOX_SUFFIX = "_blackbox.png"

#: The official stem ``<city>_<seq>_<frame>``: a lower-case city name and two 6-digit numbers.
STEM_PATTERN = re.compile(r"^(?P<city>[a-z]+(?:_[a-z]+)*)_(?P<seq>\d{6})_(?P<frame>\d{6})$")


def blackbox_relpath(official_split: str, city: str, stem: str) -> str:
    """Where the black-box prediction of an image lies inside a prediction folder, e.g.
    ``train/aachen/aachen_000000_000019_blackbox.png``: the ``leftImg8bit`` layout, with the suffix changed."""
    return f"{official_split}/{city}/{stem}{BLACKBOX_SUFFIX}"


def read_png(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Read a PNG as a numpy array (``(H, W)`` or ``(H, W, C)``) and return it with its Pillow mode."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return np.asarray(image), image.mode


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a ``uint8`` ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB) array as PNG bytes.

    The encoder settings are fixed (no metadata, compress level 6), so equal arrays give equal bytes.
    """
    from PIL import Image

    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"png_bytes expects uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}.")
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map ``(H, W)`` to ``size`` = ``(h, w)``; never mixes label values.

    Output pixel ``(i, j)`` takes source pixel ``(floor((i + 0.5) * H / h), floor((j + 0.5) * W / w))``: the
    source pixel under the output pixel's centre, the rule of Pillow's ``NEAREST`` (a 4x downsample takes
    source pixel ``4 i + 2``).
    """
    h, w = (int(s) for s in size)
    rows = np.minimum(((np.arange(h) + 0.5) * array.shape[0] / h).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * array.shape[1] / w).astype(np.int64), array.shape[1] - 1)
    return np.ascontiguousarray(array[rows[:, None], cols[None, :]])


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``uint8`` RGB image ``(H, W, 3)`` to ``size`` = ``(h, w)`` with Pillow.

    Pillow's ``BILINEAR`` widens its triangle filter when it downsamples, so a 4x reduction averages each
    output pixel's source footprint instead of aliasing.
    """
    from PIL import Image

    h, w = (int(s) for s in size)
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image), mode="RGB").resize((w, h), Image.BILINEAR))


def parse_stem(path: str | os.PathLike, suffix: str) -> str | None:
    """The official stem of a file named ``<stem><suffix>``, or None when the name does not follow the layout."""
    name = Path(path).name
    if not name.endswith(suffix):
        return None
    stem = name[: -len(suffix)]
    return stem if STEM_PATTERN.match(stem) else None


OFFICIAL_SPLITS = ("train", "val")
"""Official splits with public labels; the official test split has none."""


@dataclass(frozen=True)
class SourceImage:
    """One official image and where its outputs go.

    Attributes:
        stem: ``<city>_<seq>_<frame>``.
        city: the city folder.
        official_split: ``"train"`` or ``"val"``.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        image: path of the ``leftImg8bit`` PNG.
        label: path of the ``gtFine`` labelIds PNG (it may not exist).
        blackbox: path of the black-box prediction, or None without ``--blackbox-dir``.
    """

    stem: str
    city: str
    official_split: str
    split: str
    image: str
    label: str
    blackbox: str | None


def _split_of(official_split: str, city: str) -> str:
    if official_split == "val":
        return "test"
    return "validation" if city in CITYSCAPES_HOLDOUT_CITIES else "training"


def skip_record(
    reason: str, source: SourceImage | None = None, path: str | None = None, detail: str | None = None
) -> dict[str, Any]:
    """A skip entry for ``summary.json``: the reason, and the image, path and detail where known."""
    entry: dict[str, Any] = {"reason": reason}
    if source is not None:
        entry.update(stem=source.stem, split=source.split)
    if path is not None:
        entry["path"] = path
    if detail is not None:
        entry["detail"] = detail
    return entry


def find_images(
    root: str | os.PathLike, blackbox_dir: str | os.PathLike | None = None
) -> tuple[list[SourceImage], list[dict[str, Any]]]:
    """List the official images under ``root`` and the files that do not fit the layout.

    Returns:
        ``(images sorted by split, city and stem, skips)``; a skip is a dict with ``reason``, ``path`` (relative
        to the root) and ``detail``. Names that do not follow ``<city>_<seq>_<frame>_leftImg8bit.png``, images
        whose name's city differs from their folder, and labels without an image are skips.

    Raises:
        FileNotFoundError: ``root`` has no ``leftImg8bit/train`` or ``leftImg8bit/val`` folder.
    """
    root = Path(root)
    found = [s for s in OFFICIAL_SPLITS if (root / "leftImg8bit" / s).is_dir()]
    if not found:
        raise FileNotFoundError(
            f"--root {str(root)!r}: no leftImg8bit/train or leftImg8bit/val folder; expected the official layout "
            "leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png."
        )
    images: list[SourceImage] = []
    skips: list[dict[str, Any]] = []
    for official in found:
        image_root, label_root = root / "leftImg8bit" / official, root / "gtFine" / official
        seen: set[str] = set()
        for city_dir in sorted(p for p in image_root.iterdir() if p.is_dir()):
            city = city_dir.name
            for path in sorted(city_dir.iterdir()):
                relative = path.relative_to(root).as_posix()
                stem = parse_stem(path, IMAGE_SUFFIX)
                if stem is None:
                    skips.append(
                        skip_record("file name does not follow <city>_<seq>_<frame>_leftImg8bit.png", path=relative)
                    )
                    continue
                if not stem.startswith(f"{city}_"):
                    skips.append(skip_record("image name's city differs from its folder", path=relative, detail=city))
                    continue
                seen.add(stem)
                blackbox = None
                if blackbox_dir is not None:
                    blackbox = os.fspath(Path(blackbox_dir) / blackbox_relpath(official, city, stem))
                images.append(
                    SourceImage(
                        stem,
                        city,
                        official,
                        _split_of(official, city),
                        os.fspath(path),
                        os.fspath(label_root / city / f"{stem}{LABEL_SUFFIX}"),
                        blackbox,
                    )
                )
        if label_root.is_dir():
            for path in sorted(label_root.glob(f"*/*{LABEL_SUFFIX}")):
                stem = parse_stem(path, LABEL_SUFFIX)
                if stem is not None and stem not in seen:
                    skips.append(
                        skip_record("gtFine label without a leftImg8bit image", path=path.relative_to(root).as_posix())
                    )
    order = {name: k for k, name in enumerate(SPLIT_NAMES)}
    images.sort(key=lambda s: (order[s.split], s.city, s.stem))
    return images, skips
