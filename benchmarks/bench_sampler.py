"""Samples per second of the CAR sampler: M draws folded into the batch vs a per-sample Python loop.

Usage:
    python benchmarks/bench_sampler.py [--size 128] [--num-samples 16] [--batch 2] [--repeats 3] [--threads 2]

Prints a markdown table. Uses the default LIDC networks (SegNet F, noise-injected U-Net G) with random
weights: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import time

import torch

from car_med.networks import NoiseInjectedUNet, SegNetCalibrationNet
from car_med.sampling import CARSampler


def per_sample_loop(f, g, image, noise):
    """The authors' style: one G forward pass per sample."""
    with torch.no_grad():
        f.eval(), g.eval()
        calibration = torch.softmax(f(image), 1)
        return torch.stack([g(image, calibration, noise[:, m]).argmax(1) for m in range(noise.shape[1])], dim=1)


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    f, g = SegNetCalibrationNet(), NoiseInjectedUNet()
    image = torch.randn(args.batch, 1, args.size, args.size)
    noise = torch.randn(args.batch, args.num_samples, g.noise_dim)
    total = args.batch * args.num_samples
    rows = [("per-sample loop", timed(lambda: per_sample_loop(f, g, image, noise), args.repeats))]
    for max_batch in args.max_batch:
        sampler = CARSampler(f, g, max_batch=max_batch, return_probs=False)
        rows.append((f"folded, max_batch={max_batch}", timed(lambda s=sampler: s(image, noise=noise), args.repeats)))
    base = rows[0][1]
    print(f"\nCAR sampler, B={args.batch}, M={args.num_samples}, {args.size}x{args.size}, CPU threads={args.threads}\n")
    print("| method | seconds | samples/s | speed-up vs loop |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {total / seconds:.1f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
