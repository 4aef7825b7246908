"""The paper's toy grid (SPEC 3.3): pi x sigma x lambda x seeds, then Fig. 3a/b/c and results.csv.

Every run is the toy bundle itself (``bundles/toy/train.json`` then ``inference.json``), launched as a
subprocess so runs are isolated and can go in parallel. A run whose ``samples.npz`` exists is skipped,
so a killed sweep resumes where it stopped.

Usage:
    python -m car_med.experiments.toy_sweep --output-dir OUT [--workers 2] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from car_med.visualize.toy import plot_likelihood_curves, plot_toy_samples, toy_sample_summary

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "bundles" / "toy"
RESULT_FIELDS = (
    "pi",
    "sigma",
    "lambda_cal",
    "seed",
    "frac_below_zero_bimodal",
    "calibration_error",
    "target_error",
    "sample_std_bimodal",
    "final_log_likelihood",
)


def run_name(pi: float, sigma: float, lambda_cal: float, seed: int) -> str:
    return f"pi{pi:g}_sigma{sigma:g}_lambda{lambda_cal:g}_seed{seed}"


def _run_one(run_dir: Path, bundle_dir: Path, pi: float, sigma: float, lambda_cal: float, seed: int, extra: list[str]):
    if (run_dir / "samples.npz").is_file():
        return run_dir, "skipped"
    run_dir.mkdir(parents=True, exist_ok=True)
    common = ["--output_dir", str(run_dir), "--pi", str(pi), "--seed", str(seed)]
    train = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(bundle_dir / "train.json"),
        "--sigma",
        str(sigma),
        "--lambda_cal",
        str(lambda_cal),
        *common,
        *extra,
    ]
    overlay = str([str(bundle_dir / "train.json"), str(bundle_dir / "inference.json")])
    infer = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", overlay, *common, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(run_dir / "run.log", "a") as log:
        for command in (train, infer):
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
            if done.returncode != 0:
                return run_dir, f"failed (exit {done.returncode}), see {run_dir / 'run.log'}"
    return run_dir, "done"


def _read_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return table[:, 0], table[:, 1]


def markdown_summary(rows: list[dict]) -> str:
    """Mean (and min-max) over seeds per (pi, sigma, lambda), as a markdown table."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["pi"], row["sigma"], row["lambda_cal"]), []).append(row)
    lines = [
        "| pi | sigma | lambda | seeds | P(sample < 0), x < 0.4 | mean abs(mean - F(x)) | sample std, x < 0.4 "
        "| final log-lik |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(values: list[float], digits: int) -> str:
        return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    for (pi, sigma, lam), group in sorted(groups.items()):
        below = cell([r["frac_below_zero_bimodal"] for r in group], 3)
        error = cell([r["calibration_error"] for r in group], 3)
        spread = cell([r["sample_std_bimodal"] for r in group], 3)
        lines.append(
            f"| {pi:g} | {sigma:g} | {lam:g} | {len(group)} | {below} | {error} | {spread} | "
            f"{cell([r['final_log_likelihood'] for r in group], 2)} |"
        )
    return "\n".join(lines) + "\n"


def summarise(
    output_dir: Path, grid: list[tuple[float, float, float, int]], focus: tuple[float, float, int]
) -> list[dict]:
    """Write results.csv and fig3a/b/c.png from the finished runs; returns the result rows."""
    rows, curves, iterations = [], {}, None
    for pi, sigma, lam, seed in grid:
        run_dir = output_dir / "runs" / run_name(pi, sigma, lam, seed)
        if not (run_dir / "samples.npz").is_file():
            continue
        row = {"pi": pi, "sigma": sigma, "lambda_cal": lam, "seed": seed, **toy_sample_summary(run_dir / "samples.npz")}
        its, values = _read_curve(run_dir / "likelihood.csv")
        row["final_log_likelihood"] = float(values[-1])
        rows.append(row)
        iterations = its if iterations is None else iterations
        if len(its) == len(iterations):
            curves.setdefault(f"lambda = {lam:g}", []).append(values)
    with open(output_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    (output_dir / "summary.md").write_text(markdown_summary(rows))
    if curves:
        plot_likelihood_curves(curves, iterations, output_dir / "fig3a.png", "Data log-likelihood of G's samples")
    pi, sigma, seed = focus
    for lam, name in ((1.0, "fig3b.png"), (0.0, "fig3c.png")):
        npz = output_dir / "runs" / run_name(pi, sigma, lam, seed) / "samples.npz"
        if npz.is_file():
            plot_toy_samples(
                npz, output_dir / name, f"pi={pi:g}, sigma={sigma:g}, lambda={lam:g}, seed={seed}", data=(pi, sigma)
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--pis", type=float, nargs="+", default=[0.5, 0.6, 0.9])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.02, 0.03])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one CPU thread each)")
    parser.add_argument("--bundle-dir", type=Path, default=BUNDLE_DIR)
    parser.add_argument(
        "--focus",
        type=float,
        nargs=3,
        default=[0.9, 0.03, 0],
        metavar=("PI", "SIGMA", "SEED"),
        help="configuration drawn in fig3b (lambda=1) and fig3c (lambda=0)",
    )
    parser.add_argument("overrides", nargs="*", help="extra bundle overrides passed to training, e.g. --gan_epochs 4")
    args, unknown = parser.parse_known_args(argv)
    extra = list(args.overrides) + unknown
    # runs execute with their own folder as cwd, so every path handed to them must be absolute
    args.output_dir = args.output_dir.resolve()
    args.bundle_dir = args.bundle_dir.resolve()
    if not (args.bundle_dir / "train.json").is_file():
        parser.error(f"no train.json in --bundle-dir {args.bundle_dir}")
    grid = list(itertools.product(args.pis, args.sigmas, args.lambdas, args.seeds))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = [
            pool.submit(_run_one, args.output_dir / "runs" / run_name(*cfg), args.bundle_dir, *cfg, extra)
            for cfg in grid
        ]
        for future in tqdm(as_completed(futures), total=len(futures), desc="toy sweep", unit="run"):
            run_dir, status = future.result()
            if status.startswith("failed"):
                failures.append(f"{run_dir.name}: {status}")
    rows = summarise(args.output_dir, grid, (args.focus[0], args.focus[1], int(args.focus[2])))
    print(f"{len(rows)} of {len(grid)} runs summarised in {args.output_dir / 'results.csv'}")
    for line in failures:
        print("FAILED", line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
