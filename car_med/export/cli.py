"""What the two review commands share: ``python -m car_med.export`` (crops of a datalist) and
``python -m car_med.predict`` (a new patient's CT) take the same model and sampling options and report alike."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from car_med.hypotheses import DEFAULT_CONFIDENCE, DEFAULT_MIN_IOU

__all__ = ["add_sampling_arguments", "run_export_command", "sampling_options"]


def _fraction(low_open: bool, high_open: bool, what: str) -> Callable[[str], float]:
    """An argparse type: a number in (0, 1] or (0, 1), named in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not ((value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)):
            bounds = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"{what} must lie in {bounds}, got {value:g}")
        return value

    return parse


def add_sampling_arguments(parser: argparse.ArgumentParser, unit: str, default_num_samples: int = 16) -> None:
    """The options of both commands: model, M, seed, rerun policy, noise sharing, hypotheses, MLflow, window,
    device.

    Args:
        parser: the command's parser.
        unit: what gets M samples, in the help texts ("crop", "nodule").
        default_num_samples: M when ``--num-samples`` is not given (predict's is chosen in docs/review.md).
    """
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME/VERSION or @ALIAS, runs:/RUN/PATH, a model folder, or a bundle output folder",
    )
    parser.add_argument("--output-dir", required=True, help="the review folder")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=default_num_samples,
        help=f"samples per {unit}, M (default {default_num_samples})",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote in the folder")
    parser.add_argument(
        "--independent-slices",
        action="store_true",
        help="draw each slice's noise on its own (default: a nodule's slices share it, one 3D hypothesis per sample)",
    )
    parser.add_argument(
        "--min-iou",
        type=_fraction(low_open=True, high_open=False, what="--min-iou"),
        default=DEFAULT_MIN_IOU,
        help=f"group each {unit}'s samples into hypotheses whose every two members overlap with at least this IoU "
        f"(hypotheses.json, hypotheses_seg.dcm; default {DEFAULT_MIN_IOU:g})",
    )
    parser.add_argument(
        "--confidence",
        type=_fraction(low_open=True, high_open=True, what="--confidence"),
        default=DEFAULT_CONFIDENCE,
        help=f"confidence of each hypothesis probability's Wilson interval (default {DEFAULT_CONFIDENCE:g})",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument(
        "--roi-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
        help="model input window, centred in each crop (the training roi_size; default 128 128)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def sampling_options(args: argparse.Namespace, command: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments that :func:`add_sampling_arguments`'s options give ``export_cases`` and
    ``predict_nodules``; ``command`` is the command line, recorded in ``export.json``."""
    return {
        "num_samples": args.num_samples,
        "seed": args.seed,
        "overwrite": args.overwrite,
        "independent_slices": args.independent_slices,
        "tracking_uri": args.tracking_uri,
        "device": args.device,
        "roi_size": tuple(args.roi_size),
        "progress": not args.no_progress,
        "command": shlex.join(command),
        "min_iou": args.min_iou,
        "confidence": args.confidence,
    }


def run_export_command(module: str, argv: Sequence[str] | None, export: Callable[[list[str]], Any]) -> int:
    """Set up logging, call ``export`` with the command's words and return the exit code.

    Args:
        module: the command's module (``car_med.export``), for the recorded command line.
        argv: the arguments (``None``: ``sys.argv[1:]``).
        export: runs the command from the full command line's words and returns an ``ExportSummary``.

    Returns:
        2 when the input is refused (``ValueError``, printed without a traceback), 1 when a case failed, else 0.
    """
    from car_med.export.run import print_summary

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies
    words = ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]
    try:
        summary = export(words)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return print_summary(summary)
