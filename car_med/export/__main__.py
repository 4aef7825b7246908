"""``python -m car_med.export``: CAR samples of LIDC crops as review files (NIfTI, CT overlays, DICOM SEG)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from car_med.export.cli import add_sampling_arguments, run_export_command, sampling_options


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m car_med.export",
        description="Sample a registered CAR model on LIDC crops and write review files: per crop NIfTI in the "
        "scanner frame and a montage; optionally the samples on the full CT and DICOM SEG; a review queue "
        "(manifest.csv, index.html) sorted by ambiguity.",
    )
    parser.add_argument("--datalist", required=True, help="datalist.json of python -m preprocessing.lidc")
    parser.add_argument("--split", default="test", help="training, validation or test (default test)")
    parser.add_argument("--cases", nargs="+", metavar="ID", help="only these case ids or patient ids")
    parser.add_argument("--dicom-root", help="the LIDC-IDRI DICOM folder the crops were made from")
    parser.add_argument("--full-volume", action="store_true", help="also write the CT and the samples on its grid")
    parser.add_argument("--dicom-seg", action="store_true", help="also write one DICOM SEG per nodule")
    add_sampling_arguments(parser, unit="crop")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    def export(words: list[str]):
        from car_med.export.run import export_cases

        return export_cases(
            args.model,
            args.datalist,
            args.output_dir,
            split=args.split,
            cases=args.cases,
            dicom_root=args.dicom_root,
            full_volume=args.full_volume,
            dicom_seg=args.dicom_seg,
            **sampling_options(args, words),
        )

    return run_export_command("car_med.export", argv, export)


if __name__ == "__main__":
    sys.exit(main())
