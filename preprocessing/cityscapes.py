"""Cityscapes (official layout) -> 256x512 images and 25-class label maps for the stochastic protocol (SPEC 3.2).

Usage::

    python -m preprocessing.cityscapes --root /data/cityscapes --output-dir /data/cityscapes_256 \\
        [--blackbox-dir /data/blackbox_pred] [--size 256 512] [--workers N] [--no-progress]

Input (``--root``): ``leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png``, with ``<stem> = <city>_<seq>_<frame>``. The official
``test`` split has no public labels and is not read.

Per image: labelIds are mapped to the 19 trainIds with ignore -> 24 (:data:`LABEL_ID_TO_TRAIN_ID`); the image is
resized bilinearly and the label map by nearest neighbour (a label id is never interpolated). With
``--blackbox-dir``, the prediction ``<PRED>/<split>/<city>/<stem>_blackbox.png`` (trainIds 0..18, at the
original size or at the output size) is resized by nearest neighbour too. The 5 class flips are *not* applied
here: they are drawn per image on the fly in training (:class:`car_med.data.cityscapes.RandStochasticClassFlipd`).

Split: official train minus darmstadt, monchengladbach and ulm -> ``training``; those three cities ->
``validation``; official val -> ``test``.

Output layout (``OUT``)::

    datalist.json    {"training", "validation", "test"}: items with image, label[, blackbox] relative to OUT
    summary.json     config, counts per split and city, label pixels per class, every skip with its reason
    <split>/<city>/<stem>_image.png      RGB uint8
    <split>/<city>/<stem>_label.png      uint8, values 0..18 and 24
    <split>/<city>/<stem>_blackbox.png   uint8, values 0..18 (only with --blackbox-dir)
    records/<stem>.json                  per-image completion marker (its item or its skip, and the config)

Bad input never becomes a silent wrong label: an image without its gtFine file, an image and a label of different
sizes, a labelId outside the official table, a missing black-box prediction, one of another size or with values
outside 0..18 make that image a logged skip (in ``summary.json`` and the log), with the file and the reason.

Resuming: every file is written atomically and the image's record last, keyed by the config and by the size and
mtime of its source files; a rerun reuses every matching record, so a killed run (even SIGKILL) resumes and ends
with the same bytes as an uninterrupted one. Only one run may write to an output folder at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from car_med.data.cityscapes_layout import (
    CITYSCAPES_HOLDOUT_CITIES,
    CITYSCAPES_NUM_CLASSES,
    CITYSCAPES_NUM_TRAIN_IDS,
    SourceImage,
    find_images,
    label_ids_to_train_ids,
    png_bytes,
    read_png,
    resize_bilinear,
    resize_nearest,
    skip_record,
)
from car_med.data.splits import SPLIT_NAMES
from car_med.files import atomic_write_bytes, atomic_write_json
from preprocessing.runs import run_command, run_jobs, write_run_outputs

__all__ = ["DEFAULT_SIZE", "FORMAT_VERSION", "main", "run"]

logger = logging.getLogger("preprocessing.cityscapes")

FORMAT_VERSION = 1
"""Bump when the output content changes, so that old per-image records are recomputed, not reused."""

DEFAULT_SIZE = (256, 512)
"""Output ``(H, W)``: the official 1024x2048 downsampled by 4 (Kohl et al. 2018)."""


def _signature(path: str | None) -> list[int] | None:
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _record_config(root: Path, blackbox_dir: Path | None, size: tuple[int, int]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "root": str(root.resolve()),
        "blackbox_dir": None if blackbox_dir is None else str(blackbox_dir.resolve()),
        "size": list(size),
    }


def _read_blackbox(source: SourceImage, label_shape: tuple[int, int], size: tuple[int, int]):
    """The black-box prediction resized to ``size``, or a skip dict."""
    path = source.blackbox
    if not os.path.isfile(path):
        return skip_record(
            "missing black-box prediction", source, path, f"expected {Path(path).name} for {source.stem}"
        )
    try:
        array, mode = read_png(path)
    except Exception as err:  # Pillow raises several types on a corrupt file
        return skip_record("unreadable black-box prediction", source, path, f"{type(err).__name__}: {err}"[:200])
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        return skip_record("black-box prediction is not a single-channel label PNG", source, path, f"mode {mode}")
    if array.shape not in (tuple(label_shape), tuple(size)):
        return skip_record(
            "black-box prediction size differs from the image and the output size",
            source,
            path,
            f"{array.shape[0]}x{array.shape[1]}, expected {label_shape[0]}x{label_shape[1]} or {size[0]}x{size[1]}",
        )
    bad = np.unique(array[array >= CITYSCAPES_NUM_TRAIN_IDS])
    if bad.size:
        values = ", ".join(str(int(v)) for v in bad[:10])
        return skip_record("black-box prediction values outside trainIds 0..18", source, path, f"values {values}")
    return resize_nearest(array.astype(np.uint8), size)


def process_image(source: SourceImage, output_dir: Path, size: tuple[int, int], config: dict[str, Any]) -> dict:
    """Convert one image (and its label and black box) and write its record; returns the record.

    The record holds ``item`` (the datalist entry, with ``label_pixels``, the pixel count per class) or ``skip``.
    """
    record: dict[str, Any] = {"config": config, "sources": _sources(source), "split": source.split}
    result = _convert(source, output_dir, size)
    record["skip" if "reason" in result else "item"] = result
    atomic_write_json(output_dir / "records" / f"{source.stem}.json", record)
    return record


def _sources(source: SourceImage) -> dict[str, Any]:
    return {
        "image": _signature(source.image),
        "label": _signature(source.label),
        "blackbox": _signature(source.blackbox),
    }


def _convert(source: SourceImage, output_dir: Path, size: tuple[int, int]) -> dict[str, Any]:
    if not os.path.isfile(source.label):
        return skip_record("missing gtFine labelIds file", source, source.label, f"expected {Path(source.label).name}")
    try:
        image, image_mode = read_png(source.image)
        label_ids, label_mode = read_png(source.label)
    except Exception as err:  # Pillow raises several types on a truncated or corrupt file
        return skip_record("unreadable PNG", source, source.image, f"{type(err).__name__}: {err}"[:200])
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        return skip_record("image is not 8-bit RGB", source, source.image, f"mode {image_mode}, shape {image.shape}")
    if label_ids.ndim != 2 or not np.issubdtype(label_ids.dtype, np.integer):
        return skip_record("label is not a single-channel integer PNG", source, source.label, f"mode {label_mode}")
    if image.shape[:2] != label_ids.shape:
        return skip_record(
            "image and label sizes differ",
            source,
            source.label,
            f"image {image.shape[0]}x{image.shape[1]}, label {label_ids.shape[0]}x{label_ids.shape[1]}",
        )
    try:
        train_ids = label_ids_to_train_ids(label_ids)
    except ValueError as err:
        return skip_record("unknown labelId", source, source.label, str(err)[:300])
    blackbox = None
    if source.blackbox is not None:
        blackbox = _read_blackbox(source, label_ids.shape, size)
        if isinstance(blackbox, dict):
            return blackbox

    folder = output_dir / source.split / source.city
    relative = folder.relative_to(output_dir).as_posix()
    label = resize_nearest(train_ids, size)
    atomic_write_bytes(folder / f"{source.stem}_image.png", png_bytes(resize_bilinear(image[..., :3], size)))
    atomic_write_bytes(folder / f"{source.stem}_label.png", png_bytes(label))
    item: dict[str, Any] = {
        "image": f"{relative}/{source.stem}_image.png",
        "label": f"{relative}/{source.stem}_label.png",
    }
    if blackbox is not None:
        atomic_write_bytes(folder / f"{source.stem}_blackbox.png", png_bytes(blackbox))
        item["blackbox"] = f"{relative}/{source.stem}_blackbox.png"
    item.update(
        stem=source.stem,
        city=source.city,
        official_split=source.official_split,
        original_size=[int(label_ids.shape[0]), int(label_ids.shape[1])],
        label_pixels=np.bincount(label.ravel(), minlength=CITYSCAPES_NUM_CLASSES).tolist(),
    )
    return item


def _load_record(path: Path, config: dict[str, Any], source: SourceImage) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("config") != config or record.get("sources") != _sources(source):
        return None
    item = record.get("item")
    if item is not None:
        # the record is written last; check its files are still there (someone may have deleted outputs)
        for key in ("image", "label", "blackbox"):
            if key in item and not (path.parent.parent / item[key]).is_file():
                return None
    return record


def _worker(args: tuple) -> str:
    source, output_dir, size, config = args
    process_image(source, Path(output_dir), size, config)
    return source.stem


def run(
    root: str | os.PathLike,
    output_dir: str | os.PathLike,
    blackbox_dir: str | os.PathLike | None = None,
    size: Sequence[int] = DEFAULT_SIZE,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a Cityscapes root and write ``datalist.json`` and ``summary.json`` (see the module docstring).

    Args:
        root: the Cityscapes root holding ``leftImg8bit/`` and ``gtFine/``.
        output_dir: where to write; finished images found there are reused.
        blackbox_dir: folder of black-box predictions ``<split>/<city>/<stem>_blackbox.png``, or None.
        size: output ``(H, W)``.
        workers: processes.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The content of ``summary.json``: ``config``, ``counts`` (``images_per_split``, ``images_per_city``,
        ``label_pixels_per_split`` (pixels per class id 0..24), ``skipped_by_reason``) and ``skipped``.

    Raises:
        FileNotFoundError: the root or the black-box folder does not exist.
        ValueError: a bad ``size`` or ``workers``.
    """

    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"--size must be two positive integers H W, got {size}.")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}.")
    root, output_dir = Path(root), Path(output_dir)
    if blackbox_dir is not None:
        blackbox_dir = Path(blackbox_dir)
        if not blackbox_dir.is_dir():
            raise FileNotFoundError(f"--blackbox-dir {str(blackbox_dir)!r} is not a directory.")
    sources, layout_skips = find_images(root, blackbox_dir)
    config = _record_config(root, blackbox_dir, size)
    records_dir = output_dir / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.rglob(".*.tmp"):  # left by a killed run's atomic writes
        stale.unlink(missing_ok=True)
    todo = [s for s in sources if _load_record(records_dir / f"{s.stem}.json", config, s) is None]
    logger.info("%d images, %d already done, %d to process", len(sources), len(sources) - len(todo), len(todo))

    jobs = [(s, str(output_dir), size, config) for s in todo]
    run_jobs(_worker, jobs, "Cityscapes images", "image", workers, progress)

    records = []
    for source in sources:
        record = _load_record(records_dir / f"{source.stem}.json", config, source)
        if record is None:
            raise RuntimeError(f"image {source.stem}: record missing or stale after processing; see the log above.")
        records.append(record)
    return _write_outputs(records, layout_skips, output_dir, config)


def _write_outputs(
    records: list[dict[str, Any]], layout_skips: list[dict[str, Any]], output_dir: Path, config: dict[str, Any]
) -> dict[str, Any]:
    datalist: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_NAMES}
    pixels = {name: np.zeros(CITYSCAPES_NUM_CLASSES, dtype=np.int64) for name in SPLIT_NAMES}
    skipped = list(layout_skips)
    for record in records:
        if "skip" in record:
            skipped.append(record["skip"])
            continue
        item, split = dict(record["item"]), record["split"]
        pixels[split] += np.asarray(item.pop("label_pixels"), dtype=np.int64)
        datalist[split].append(item)
    skipped.sort(key=lambda s: (s.get("split", ""), s.get("stem", ""), s.get("path", ""), s["reason"]))
    for entry in skipped:
        logger.warning(
            "skipped %s: %s (%s)", entry.get("stem", entry.get("path")), entry["reason"], entry.get("detail")
        )
    summary = {
        "config": {key: value for key, value in config.items() if key != "root"}
        | {"holdout_cities": list(CITYSCAPES_HOLDOUT_CITIES)},
        "counts": {
            "images_per_split": {name: len(datalist[name]) for name in SPLIT_NAMES},
            "images_per_city": {
                name: dict(sorted(Counter(item["city"] for item in datalist[name]).items())) for name in SPLIT_NAMES
            },
            "label_pixels_per_split": {name: pixels[name].tolist() for name in SPLIT_NAMES},
            "skipped": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        },
        "skipped": skipped,
    }
    write_run_outputs(output_dir, summary, datalist)
    return summary


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.cityscapes",
        description="Cityscapes (official layout) -> 256x512 images, 25-class labels and datalist.json (SPEC 3.2).",
    )
    parser.add_argument("--root", required=True, help="Cityscapes root holding leftImg8bit/ and gtFine/")
    parser.add_argument("--output-dir", required=True, help="output folder; finished images found there are reused")
    parser.add_argument(
        "--blackbox-dir",
        default=None,
        help="black-box predictions <split>/<city>/<stem>_blackbox.png, trainIds 0..18 (see car_med.blackbox)",
    )
    parser.add_argument(
        "--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("H", "W"), help="output size (256 512)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def _describe_run(summary: dict[str, Any]) -> str:
    counts = summary["counts"]
    per_split = ", ".join(f"{k} {v}" for k, v in counts["images_per_split"].items())
    return f"{per_split}; {counts['skipped']} skipped"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parse_args(argv)
    run_command(run, args, _describe_run, logger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
