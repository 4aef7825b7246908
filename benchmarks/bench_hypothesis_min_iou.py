"""Choose the default ``min_iou`` of the hypotheses on the LIDC validation split (issue 28).

Usage:
    python benchmarks/bench_hypothesis_min_iou.py --run-dir lidc_quality [--min-iou 0.3 0.4 0.5 0.6 0.7]
        [--split validation] [bundle overrides of the run, e.g. --stage2_iterations 3000]

``--run-dir`` is the output folder of ``benchmarks/bench_lidc_quality.py`` (its ``car`` model and ``crops``).
For each ``min_iou`` it runs ``monai.bundle run evaluating`` of CAR's chosen checkpoint on ``--split`` with
``hypothesis_min_iou`` set (same seed, so the same samples every time; only the grouping and the readers'
assignment change) and prints, per value: the hypothesis ECE and uncovered share of CAR, of the majority vote
and of the readers' leave-one-out, and CAR's mean number of hypotheses per nodule. The test split is never
read here: the default is chosen from this table (docs/metrics.md). Each evaluation resumes from its own
``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_OVERLAY = HERE / "lidc_quality.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--min-iou", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--split", default="validation")
    parser.add_argument("--threads", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    if args.split == "test":
        parser.error("settings are chosen on the validation split; the test split only reports")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from car_med.experiments import lidc_demo

    config = json.loads(CPU_OVERLAY.read_text())
    rows = []
    for min_iou in args.min_iou:
        report = args.run_dir / "car" / "evaluation" / f"{args.split}_min_iou_{min_iou:g}" / "metrics.json"
        if not report.is_file():
            run = [*overrides, "--output_dir", str(args.run_dir / "car"), "--dataset_dir", str(args.run_dir / "crops")]
            run += ["--progress", "False", "--eval_split", args.split, "--hypothesis_min_iou", str(min_iou)]
            run += ["--eval_output_dir", str(report.parent)]
            lidc_demo.run_bundle(
                "evaluating", ["train.json", "demo.json", str(CPU_OVERLAY), "evaluate.json"], run, dict(os.environ)
            )
        metrics = json.loads(report.read_text())
        rows.append((min_iou, metrics))
    print(
        f"\nhypotheses on the {args.split} split ({rows[0][1]['num_cases']} crops), CAR with min_component_size "
        f"{config.get('sampler_min_component_size', 0)}; ECE / uncovered share (lower is better)\n"
    )
    print(
        "| min_iou | CAR ECE | CAR uncovered | CAR hypotheses per nodule | majority vote ECE | majority vote uncovered "
        "| readers' leave-one-out ECE | leave-one-out uncovered |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for min_iou, report in rows:
        car, refs = report["metrics"], report["references"]
        vote, loo = refs["majority_vote"], refs["readers_leave_one_out"]
        print(
            f"| {min_iou:g} | {car['hypothesis_ece']:.3f} | {car['hypothesis_uncovered']:.3f} "
            f"| {car['hypotheses_per_nodule']:.2f} | {vote['hypothesis_ece']:.3f} | {vote['hypothesis_uncovered']:.3f} "
            f"| {loo['hypothesis_ece']:.3f} | {loo['hypothesis_uncovered']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
