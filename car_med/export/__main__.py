"""``python -m car_med.export``: CAR samples of LIDC crops as review files (NIfTI, CT overlays, DICOM SEG)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m car_med.export",
        description="Sample a registered CAR model on LIDC crops and write review files: per crop NIfTI in the "
        "scanner frame and a montage; optionally the samples on the full CT and DICOM SEG; a review queue "
        "(manifest.csv, index.html) sorted by ambiguity.",
    )
    parser.add_argument(
        "--model", required=True, help="models:/NAME/VERSION, runs:/RUN/PATH, or a bundle output folder"
    )
    parser.add_argument("--datalist", required=True, help="datalist.json of python -m preprocessing.lidc")
    parser.add_argument("--split", default="test", help="training, validation or test (default test)")
    parser.add_argument("--cases", nargs="+", metavar="ID", help="only these case ids or patient ids")
    parser.add_argument("--num-samples", type=int, default=16, help="samples per crop, M (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="export seed (default 0)")
    parser.add_argument("--output-dir", required=True, help="export folder")
    parser.add_argument("--dicom-root", help="the LIDC-IDRI DICOM folder the crops were made from")
    parser.add_argument("--full-volume", action="store_true", help="also write the CT and the samples on its grid")
    parser.add_argument("--dicom-seg", action="store_true", help="also write one DICOM SEG per nodule")
    parser.add_argument("--overwrite", action="store_true", help="replace cases already in the export folder")
    parser.add_argument(
        "--independent-slices",
        action="store_true",
        help="draw each crop's noise on its own (default: a nodule's crops share it, one 3D hypothesis per sample)",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument(
        "--roi-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
        help="model input window, centred in each crop (the training roi_size; default 128 128)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies
    from car_med.export.run import export_cases, print_summary

    words = ["python", "-m", "car_med.export", *(sys.argv[1:] if argv is None else argv)]
    try:
        summary = export_cases(
            args.model,
            args.datalist,
            args.output_dir,
            split=args.split,
            cases=args.cases,
            num_samples=args.num_samples,
            seed=args.seed,
            dicom_root=args.dicom_root,
            full_volume=args.full_volume,
            dicom_seg=args.dicom_seg,
            overwrite=args.overwrite,
            tracking_uri=args.tracking_uri,
            device=args.device,
            roi_size=tuple(args.roi_size),
            progress=not args.no_progress,
            command=shlex.join(words),
            independent_slices=args.independent_slices,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return print_summary(summary)


if __name__ == "__main__":
    sys.exit(main())
