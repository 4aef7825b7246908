"""Hypotheses against a known answer: the 2D tail harness at two tail probabilities (issue 28, check 3.1).

Usage:
    python benchmarks/bench_tail_hypotheses.py [--output-dir runs/tail_hypotheses] [--tail-probabilities 0.3 0.5]
        [--num-samples 100] [--num-test-images 100] [--g-iterations 5000] [--threads 2]

For each tail probability p it trains F, then CAR's G and D (``car_med.experiments.tail_calibration``, the CAR
variant only, defaults of :class:`TailCheckConfig` otherwise), draws ``--num-samples`` samples for each of
``--num-test-images`` held-out images and groups each image's samples with ``car_med.hypotheses.group_samples``.
``min_iou`` is set halfway between the two label modes' IoU (disc against disc + tail, fixed by the geometry)
and 1: two samples of one mode overlap more than that, two of different modes less.

A hypothesis draws the tail when its representative covers more than half of the tail. The table gives, per p,
the mean total probability of those hypotheses (target: p, within 0.03), the sample-level tail frequency of the
same samples (at least 90% of the tail), F's own probability on the tail, the mean number of hypotheses per
image, the mass outside each image's two largest hypotheses (fragments), the share of images whose Wilson
interval (95%) of the tail mass holds p, and whether every image's hypotheses partition its samples. It writes
``results.json``. Training dominates the cost; the grouping takes milliseconds per image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from car_med.experiments.tail_calibration import TailCheckConfig, mode_iou, run_tail_check, tail_hypotheses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/tail_hypotheses"))
    parser.add_argument("--tail-probabilities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--num-samples", type=int, default=100, help="M per test image")
    parser.add_argument("--num-test-images", type=int, default=100)
    parser.add_argument("--g-iterations", type=int, default=TailCheckConfig.g_iterations)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for p in args.tail_probabilities:
        config = replace(
            TailCheckConfig(),
            tail_probability=p,
            num_test_images=args.num_test_images,
            eval_samples=args.num_samples,
            g_iterations=args.g_iterations,
            report_at=(),
            variants=("CAR",),
        )
        started = time.perf_counter()
        results, samples, test = run_tail_check(config, progress=True)
        batch = test.batch()
        modes = mode_iou(batch["tail"], batch["disc"])
        min_iou = (modes + 1) / 2
        grouped = time.perf_counter()
        hypotheses = tail_hypotheses(samples["CAR"], batch["tail"], true_probability=p, min_iou=min_iou)
        rows[p] = {
            **hypotheses,
            "mode_iou": modes,
            "min_iou": min_iou,
            "sample_tail_frequency": results["CAR"]["tail_frequency"],
            "partial_share": results["CAR"]["partial_share"],
            "f_tail_probability": results["CAR"]["f_tail_probability"],
            "grouping_seconds": time.perf_counter() - grouped,
            "seconds": time.perf_counter() - started,
            "config": asdict(config),
        }
        (args.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
        print(f"p={p}: {json.dumps({k: round(v, 4) for k, v in rows[p].items() if isinstance(v, float)})}", flush=True)
    print(
        f"\nhypotheses on the 2D tail, CAR, M={args.num_samples}, {args.num_test_images} test images, "
        f"{args.g_iterations} stage-2 iterations, {args.threads} threads\n"
    )
    print(
        "| p | min_iou (modes' IoU) | tail hypotheses' probability | gap | sample tail frequency | F on tail "
        "| hypotheses per image | fragment mass | interval holds p | partitions |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p, row in rows.items():
        print(
            f"| {p:g} | {row['min_iou']:.3f} ({row['mode_iou']:.3f}) | {row['tail_probability']:.3f} "
            f"| {row['tail_probability'] - p:+.3f} | {row['sample_tail_frequency']:.3f} "
            f"| {row['f_tail_probability']:.3f} | {row['hypotheses_per_image']:.2f} | {row['fragment_mass']:.3f} "
            f"| {row['interval_coverage']:.2f} | {'yes' if row['max_partition_error'] < 1e-9 else 'NO'} |"
        )
    print(f"\nwrote {args.output_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
