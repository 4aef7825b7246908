"""Synthetic street scenes in the official Cityscapes layout, with a noisy black-box prediction folder.

Usage::

    python -m preprocessing.synthetic_cityscapes --output-dir /tmp/cityscapes_synth \\
        [--blackbox-dir /tmp/cityscapes_synth_pred] [--images-per-city 4] [--size 512 1024] [--seed 0]

Writes ``leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<city>_<seq>_000019_gtFine_labelIds.png`` (official labelIds) for the cities in
:data:`TRAIN_CITIES` (the three held-out validation cities included) and :data:`VAL_CITIES`. Every scene holds
sky, buildings, vegetation, road, sidewalk, cars, persons, a pole with a traffic sign, terrain and ignore regions
(the ego vehicle at the bottom, a "static" blob), so the 5 base classes of the flips are in every image. Each
class is drawn with its Cityscapes colour, jittered per image, plus pixel noise, so a small network can learn it.

With ``--blackbox-dir`` it also writes ``<PRED>/<split>/<city>/<stem>_blackbox.png``: the true trainIds with
ignore shown as road, shifted by a few pixels (boundary errors) and with two random rectangles of a wrong class,
at the original size: what a decent but imperfect segmenter would predict.

Everything is a deterministic function of ``--seed`` (each image from its own ``(seed, city, index)`` stream).
The real size is 1024x2048 (``--size 1024 2048``); the default 512x1024 keeps tests and the demo fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from car_med.data.cityscapes_layout import (
    CITYSCAPES_IGNORE_CLASS,
    IMAGE_SUFFIX,
    LABEL_SUFFIX,
    blackbox_relpath,
    label_ids_to_train_ids,
    png_bytes,
)
from car_med.files import atomic_write_bytes

__all__ = ["DEFAULT_SIZE", "TRAIN_CITIES", "VAL_CITIES", "make_blackbox", "make_scene", "main", "write_synthetic"]

logger = logging.getLogger("preprocessing.synthetic_cityscapes")

DEFAULT_SIZE = (512, 1024)
TRAIN_CITIES = ("aachen", "bochum", "darmstadt", "monchengladbach", "ulm", "zurich")
VAL_CITIES = ("frankfurt", "lindau", "munster")

# Cityscapes labelIds used in the scenes, with their official colours (cityscapesScripts labels.py).
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = 7, 8, 11, 17, 20, 21, 22, 23, 24, 26
EGO, STATIC = 1, 4
COLOURS = {
    ROAD: (128, 64, 128),
    SIDEWALK: (244, 35, 232),
    BUILDING: (70, 70, 70),
    POLE: (153, 153, 153),
    SIGN: (220, 220, 0),
    VEGETATION: (107, 142, 35),
    TERRAIN: (152, 251, 152),
    SKY: (70, 130, 180),
    PERSON: (220, 20, 60),
    CAR: (0, 0, 142),
    EGO: (20, 20, 20),
    STATIC: (111, 74, 0),
}


def make_scene(rng: np.random.Generator, size: Sequence[int] = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: ``(image (H, W, 3) uint8, labelIds (H, W) uint8)``.

    All shapes are placed in fractions of the image size, so any size gives the same scene layout.
    """
    h, w = (int(s) for s in size)
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    label = np.full((h, w), SKY, dtype=np.uint8)

    horizon = rng.uniform(0.42, 0.52)
    # buildings: blocks with random skyline heights
    edges = np.sort(rng.uniform(0, 1, 5))
    tops = rng.uniform(0.08, 0.3, 6)
    block = np.searchsorted(edges, x)
    label[(y >= tops[block]) & (y < horizon)] = BUILDING
    # trees in front of the buildings
    for _ in range(int(rng.integers(2, 4))):
        cx, cy, rx, ry = (
            rng.uniform(0.05, 0.95),
            rng.uniform(0.25, 0.4),
            rng.uniform(0.04, 0.09),
            rng.uniform(0.06, 0.1),
        )
        label[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1] = VEGETATION
    # ground: road in the middle, sidewalks at the sides, a terrain strip at the far left
    below = y >= horizon
    depth = (y - horizon) / (1 - horizon)  # 0 at the horizon, 1 at the bottom
    vanish = rng.uniform(0.42, 0.58)
    half = 0.04 + 0.5 * depth
    road = below & (np.abs(x - vanish) < half)
    label[below] = SIDEWALK
    label[road] = ROAD
    label[below & (x < vanish - half - 0.12 - 0.2 * depth)] = TERRAIN
    # cars on the road, persons on the sidewalks
    for _ in range(int(rng.integers(1, 4))):
        d = rng.uniform(0.15, 0.6)
        cy = horizon + d * (1 - horizon)
        cx = vanish + rng.uniform(-0.7, 0.7) * (0.04 + 0.5 * d)
        cw, ch = 0.05 + 0.2 * d, 0.03 + 0.12 * d
        label[(np.abs(x - cx) < cw / 2) & (y > cy - ch) & (y < cy)] = CAR
    for _ in range(int(rng.integers(1, 4))):
        d = rng.uniform(0.1, 0.5)
        side = rng.choice((-1.0, 1.0))
        cy = horizon + d * (1 - horizon)
        cx = vanish + side * (0.04 + 0.5 * d + rng.uniform(0.02, 0.08))
        pw, ph = 0.008 + 0.03 * d, 0.06 + 0.2 * d
        label[(np.abs(x - cx) < pw / 2) & (y > cy - ph) & (y < cy)] = PERSON
    # a pole with a sign, a static blob, the ego vehicle's bonnet
    px = rng.uniform(0.75, 0.9)
    label[(np.abs(x - px) < 0.004) & (y > 0.2) & (y < horizon + 0.1)] = POLE
    label[(np.abs(x - px) < 0.015) & (y > 0.2) & (y < 0.25)] = SIGN
    sx, sy = rng.uniform(0.05, 0.3), horizon + rng.uniform(0.02, 0.08)
    label[(np.abs(x - sx) < 0.02) & (np.abs(y - sy) < 0.02)] = STATIC
    label[y > 0.93 - 0.03 * (1 - ((x - 0.5) * 2) ** 2)] = EGO

    image = np.zeros((h, w, 3), dtype=np.float32)
    for label_id, colour in COLOURS.items():
        jitter = rng.uniform(-20, 20, 3)
        image[label == label_id] = np.clip(np.asarray(colour, dtype=np.float32) + jitter, 0, 255)
    shade = (0.85 + 0.3 * y)[..., None].astype(np.float32)  # lighter at the bottom, like a real street
    image = image * shade + rng.normal(0, 8, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def make_blackbox(rng: np.random.Generator, label_ids: np.ndarray) -> np.ndarray:
    """A noisy trainId prediction ``(H, W)`` uint8 in 0..18 for a scene's labelIds: shifted, with two wrong
    rectangles, ignore shown as road."""
    train_ids = label_ids_to_train_ids(label_ids)
    train_ids[train_ids == CITYSCAPES_IGNORE_CLASS] = 0
    h, w = train_ids.shape
    dy, dx = (int(v) for v in rng.integers(-2, 3, 2) * max(1, h // 256))
    pred = np.roll(train_ids, (dy, dx), axis=(0, 1))
    present = np.unique(train_ids)
    for _ in range(2):
        rh, rw = int(rng.integers(h // 16, h // 6 + 1)), int(rng.integers(w // 16, w // 6 + 1))
        top, left = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
        pred[top : top + rh, left : left + rw] = rng.choice(present)
    return pred.astype(np.uint8)


def write_synthetic(
    output_dir: str | Path,
    blackbox_dir: str | Path | None = None,
    images_per_city: int = 4,
    size: Sequence[int] = DEFAULT_SIZE,
    seed: int = 0,
    train_cities: Sequence[str] = TRAIN_CITIES,
    val_cities: Sequence[str] = VAL_CITIES,
) -> dict[str, Any]:
    """Write the synthetic tree (and black-box folder); returns ``{"images": {official split: count}, "stems": [...]}``.

    Args:
        output_dir: the Cityscapes-style root to write (``leftImg8bit/``, ``gtFine/``).
        blackbox_dir: where to write the black-box predictions, or None for none.
        images_per_city: images per city.
        size: original ``(H, W)``; 1024x2048 is the real size.
        seed: the seed everything derives from.
        train_cities: cities of the official train split.
        val_cities: cities of the official val split.
    """
    if images_per_city < 1:
        raise ValueError(f"--images-per-city must be >= 1, got {images_per_city}.")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"--size must be two integers H W of at least 16, got {size}.")
    root = Path(output_dir)
    counts: dict[str, int] = {}
    stems: list[str] = []
    for official, cities in (("train", train_cities), ("val", val_cities)):
        for city in cities:
            city_key = int.from_bytes(city.encode()[:8].ljust(8, b"\0"), "little")
            for k in range(images_per_city):
                stem = f"{city}_{k:06d}_000019"
                rng = np.random.default_rng([seed, city_key, k])
                image, label = make_scene(rng, size)
                atomic_write_bytes(root / "leftImg8bit" / official / city / f"{stem}{IMAGE_SUFFIX}", png_bytes(image))
                atomic_write_bytes(root / "gtFine" / official / city / f"{stem}{LABEL_SUFFIX}", png_bytes(label))
                if blackbox_dir is not None:
                    pred = make_blackbox(rng, label)
                    atomic_write_bytes(Path(blackbox_dir) / blackbox_relpath(official, city, stem), png_bytes(pred))
                counts[official] = counts.get(official, 0) + 1
                stems.append(stem)
    return {"images": counts, "stems": stems}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.synthetic_cityscapes",
        description="Synthetic street scenes in the official Cityscapes layout, plus a noisy black-box folder.",
    )
    parser.add_argument("--output-dir", required=True, help="the Cityscapes-style root to write")
    parser.add_argument("--blackbox-dir", default=None, help="also write noisy black-box predictions here")
    parser.add_argument("--images-per-city", type=int, default=4, help="images per city (default 4)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("H", "W"), help="image size (512 1024)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = write_synthetic(args.output_dir, args.blackbox_dir, args.images_per_city, args.size, args.seed)
    logger.info("wrote %s images to %s", result["images"], args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
