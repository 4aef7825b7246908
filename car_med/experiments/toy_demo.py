"""The README's first command: train and sample the toy bundle end to end on built-in data.

Runs ``bundles/toy/train.json`` (F, then G and D) and then ``train.json`` with the ``inference.json``
overlay through ``monai.bundle.run`` in this process, with the same overrides for both, then draws the
Fig. 3b-style figure and prints the numbers and where the MLflow run lives.

Usage:
    python -m car_med.experiments.toy_demo --output-dir demo_output [bundle overrides, e.g. --gan_epochs 2]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from car_med.experiments.toy_sweep import BUNDLE_DIR
from car_med.visualize.toy import plot_toy_samples, toy_sample_summary


def _parse_overrides(tokens: list[str]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    it = iter(tokens)
    for key in it:
        if not key.startswith("--"):
            raise SystemExit(f"unexpected argument {key!r}: overrides look like --name value")
        value = next(it, None)
        if value is None:
            raise SystemExit(f"override {key} has no value")
        try:
            overrides[key[2:]] = int(value)
        except ValueError:
            try:
                overrides[key[2:]] = float(value)
            except ValueError:
                overrides[key[2:]] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--bundle-dir", type=Path, default=BUNDLE_DIR)
    args, rest = parser.parse_known_args(argv)
    overrides = _parse_overrides(rest)
    from monai.bundle import run

    output_dir = args.output_dir.resolve()
    warnings.filterwarnings("ignore", message="parsing config_file")
    train_config = str(args.bundle_dir / "train.json")
    run("training", config_file=train_config, output_dir=str(output_dir), **overrides)
    # the overlay reuses train.json's networks and keys, so the same overrides describe the same model
    inference_config = [train_config, str(args.bundle_dir / "inference.json")]
    run("inference", config_file=inference_config, output_dir=str(output_dir), **overrides)

    summary = toy_sample_summary(output_dir / "samples.npz")
    import json

    defaults = json.loads((args.bundle_dir / "train.json").read_text())
    pi, sigma = float(overrides.get("pi", defaults["pi"])), float(overrides.get("sigma", defaults["sigma"]))
    figure = plot_toy_samples(
        output_dir / "samples.npz", output_dir / "samples.png", f"CAR toy, pi={pi:g}, sigma={sigma:g}", data=(pi, sigma)
    )
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{output_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["car_toy"], order_by=["start_time DESC"], max_results=1)
    print("\n=== car-med toy demo ===")
    print(f"fraction of samples below 0 for x < 0.4 : {summary['frac_below_zero_bimodal']:.3f}  (data: pi)")
    print(f"mean |mean of samples - F(x)|          : {summary['calibration_error']:.4f}")
    print(f"samples, F(x) and D's landscape        : {output_dir / 'samples.npz'}")
    print(f"figure                                 : {figure}")
    if len(runs):
        losses = sorted(c[len("metrics.") :] for c in runs.columns if c.startswith("metrics."))
        print(f"MLflow run {runs.iloc[0]['run_id']} in sqlite:///{output_dir / 'mlflow.db'} with metrics {losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
