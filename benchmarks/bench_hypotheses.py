"""What hypotheses cost, and which M a nodule needs (issue 28).

Usage:
    python benchmarks/bench_hypotheses.py [--part grouping|sampling|both] [--repeats 5] [--threads 2]

``grouping``: the time of ``car_med.hypotheses.group_samples`` on one nodule of 10 x 128 x 128 voxels at
M = 16, 64 and 256 (median over ``--repeats``). The sample volumes are crafted to look like a model's: three
outlines of one nodule (spheres of 3, 4 and 5 voxels radius around one centre, shares 0.5 / 0.3 / 0.1), each
sample jittered by one voxel, and 10% empty.

``sampling``: for M in ``--num-samples``, the half-width of the 95% Wilson interval at p = 0.5 (how precise a
hypothesis' probability can be with M samples) beside the seconds per nodule of 10 slices of 128 x 128 pixels
with ``bundles/lidc/train.json``'s network sizes (random weights: speed does not depend on them): CARSampler
with one noise vector per nodule and sample (what ``car_med.predict`` does), then ``group_samples`` on the M
sample volumes. ``predict``'s default M is chosen from this table (docs/review.md).

Prints markdown tables; every figure is a median over repeats, with the thread count stated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from car_med.hypotheses import group_samples, wilson_interval
from car_med.networks import build_network
from car_med.sampling import CARSampler

TRAIN_JSON = Path(__file__).resolve().parents[1] / "bundles" / "lidc" / "train.json"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def crafted_nodule(num_samples: int, seed: int = 0, shape: tuple[int, int, int] = (10, 128, 128)) -> np.ndarray:
    """M sample volumes of one nodule: three outlines and 10% empty samples, each shifted in-plane by a voxel."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = np.array(shape) / 2
    outlines = rng.choice([3.0, 4.0, 5.0, 0.0], size=num_samples, p=[0.5, 0.3, 0.1, 0.1])
    samples = np.zeros((num_samples, *shape), dtype=bool)
    for m, radius in enumerate(outlines):
        if radius == 0:
            continue
        dz, dy, dx = centre + np.array([0, *rng.integers(-1, 2, size=2)])
        samples[m] = ((zz - dz) * 2.5) ** 2 / 4 + (yy - dy) ** 2 + (xx - dx) ** 2 <= radius**2
    return samples


def grouping_table(repeats: int) -> list[dict]:
    rows = []
    for m in (16, 64, 256):
        samples = crafted_nodule(m)
        seconds = median_seconds(lambda s=samples: group_samples(s, spacing=(2.5, 0.7, 0.7)), repeats)
        hypotheses = group_samples(samples)
        rows.append({"M": m, "seconds": seconds, "hypotheses": len(hypotheses)})
    return rows


def sampling_table(num_samples: list[int], repeats: int, slices: int = 10, size: int = 128) -> list[dict]:
    config = json.loads(TRAIN_JSON.read_text())
    torch.manual_seed(0)
    f = build_network(config["calibration_network_spec"], "calibration_network_spec")
    g = build_network(config["refinement_network_spec"], "refinement_network_spec")
    max_batch = config["sampler_max_batch"]
    image = torch.randn(slices, 1, size, size)
    rows = []
    for m in num_samples:
        sampler = CARSampler(f, g, num_samples=m, max_batch=max_batch, return_probs=False)
        # one noise vector per sample, shared by the nodule's slices (car_med.predict's default)
        noise = torch.randn(1, m, g.noise_dim).expand(slices, -1, -1).contiguous()

        def predict_nodule(sampler=sampler, noise=noise) -> None:
            volumes = sampler(image, noise=noise).samples.transpose(0, 1) == 1  # (M, slices, H, W)
            group_samples(volumes.numpy(), spacing=(2.5, 0.7, 0.7))

        low, high = wilson_interval(m // 2, m)  # p = 0.5 for even M
        rows.append({"M": m, "half_width": (high - low) / 2, "seconds": median_seconds(predict_nodule, repeats)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("grouping", "sampling", "both"), default="both")
    parser.add_argument("--num-samples", type=int, nargs="+", default=[8, 16, 32, 64, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("grouping", "both"):
        print(f"\ngroup_samples on one 10 x 128 x 128 nodule, median of {args.repeats}, {args.threads} threads\n")
        print("| M | seconds | hypotheses |\n|---|---|---|")
        for row in grouping_table(args.repeats):
            print(f"| {row['M']} | {row['seconds']:.4f} | {row['hypotheses']} |")
    if args.part in ("sampling", "both"):
        print(
            f"\nper nodule (10 slices of 128 x 128, train.json sizes, CPU): sampler + grouping, median of "
            f"{args.repeats}, {args.threads} threads\n"
        )
        print("| M | 95% interval half-width at p = 0.5 | seconds per nodule |\n|---|---|---|")
        for row in sampling_table(args.num_samples, args.repeats):
            print(f"| {row['M']} | {row['half_width']:.3f} | {row['seconds']:.2f} |")


if __name__ == "__main__":
    main()
