"""GED + HM-IoU on an LIDC-test-sized workload: car_med's batched kernel vs a naive per-pair numpy loop.

Usage:
    python benchmarks/bench_metrics.py [--n-images 1992] [--size 128] [--raters 4] [--samples 16 100]
        [--batch-size 32] [--naive-images 10] [--threads 1] [--pattern lesion|random] [--cityscapes-images 4]

The workload is synthetic but LIDC-shaped: 128x128 masks, 4 raters, lesion-like ellipses near the centre whose
size and position vary between raters and samples, and about a quarter of the raters (a fifth of the samples) empty.
``--pattern random`` instead draws every pixel independently (dense foreground, the kernel's worst case).

The naive baseline follows the published evaluation scripts: for every pair, compute the IoU with numpy in nested
Python loops (the N x R, N x N and R x R matrices for GED, then the N x N matrix of samples against tiled labels for
HM-IoU, solved with ``scipy.optimize.linear_sum_assignment``). It is timed on ``--naive-images`` images and
extrapolated linearly to ``--n-images``; its results are checked against the kernel on those images.

A second table times the Cityscapes setting (256x512, 32 weighted modes, 10 classes, ignore 24/255) on
``--cityscapes-images`` images, to show that memory stays bounded at N=100.

Memory is the peak resident set size (VmHWM from /proc/self/status) while the metric code runs, with the peak reset
through /proc/self/clear_refs before each timed call; the inputs of the batch are included, and "+" is the growth
during the call. glibc's mmap threshold is fixed at 64 KiB so that freed tensors leave RSS and each call's own peak
shows. Where that interface is
missing, ``resource.getrusage`` (process-lifetime peak) is reported instead. Data generation is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import re
import resource
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from car_med.metrics import (
    CITYSCAPES_IGNORE_INDEX,
    CITYSCAPES_SWITCHABLE_CLASSES,
    energy_distance_from_iou,
    generalized_energy_distance,
    hungarian_matched_iou,
    matched_iou_from_matrix,
    pairwise_iou,
    stochastic_label_modes,
    stochastic_mode_weights,
)


class PeakMemory:
    """Peak RSS of this process within a window, in MiB."""

    def __init__(self) -> None:
        self.exact = Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()
        # glibc keeps freed blocks below its (adaptive) mmap threshold for reuse, which would hide a call's
        # allocations from RSS; a fixed 64 KiB threshold maps and unmaps every large tensor
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD

    @staticmethod
    def _status_kib(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    def reset(self) -> None:
        if self.exact:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.exact = False

    def peak_mib(self) -> float:
        if self.exact:
            return self._status_kib("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @property
    def method(self) -> str:
        return "VmHWM reset per call" if self.exact else "ru_maxrss (process lifetime)"


def make_batch(rng: np.random.Generator, batch: int, n: int, r: int, size: int, pattern: str):
    """Synthetic samples ``(B, N, H, W)`` and labels ``(B, R, H, W)``, uint8."""
    if pattern == "random":
        return (
            (rng.random((batch, n, size, size)) < 0.5).astype(np.uint8),
            (rng.random((batch, r, size, size)) < 0.5).astype(np.uint8),
        )
    grid = np.arange(size, dtype=np.float32)
    centre = size / 2 + rng.uniform(-8, 8, size=(batch, 1, 2)).astype(np.float32)
    radii = rng.uniform(2, 18, size=(batch, 1, 2)).astype(np.float32)

    def ellipses(k: int, scale: float, shift: float, p_empty: float) -> np.ndarray:
        c = centre + rng.normal(0, shift, size=(batch, k, 2)).astype(np.float32)
        rad = radii * rng.uniform(1 - scale, 1 + scale, size=(batch, k, 2)).astype(np.float32)
        dy = ((grid[None, None, :] - c[..., :1]) / rad[..., :1]) ** 2  # (B, K, H)
        dx = ((grid[None, None, :] - c[..., 1:]) / rad[..., 1:]) ** 2  # (B, K, W)
        masks = (dy[..., :, None] + dx[..., None, :]) <= 1.0
        masks[rng.random((batch, k)) < p_empty] = False
        return masks.astype(np.uint8)

    return ellipses(n, 0.3, 2.0, 0.2), ellipses(r, 0.2, 1.5, 0.25)


def make_cityscapes_batch(rng: np.random.Generator, batch: int, n: int, height: int = 256, width: int = 512):
    """Blocky 256x512 label maps with the stochastic classes and ignore, their 32 modes, and N noisy mode samples."""
    palette = np.array([0, 1, 2, 5, 8, 10, 11, 13, 24], dtype=np.uint8)
    coarse = rng.choice(palette, size=(batch, height // 16, width // 16))
    base = torch.from_numpy(coarse.repeat(16, axis=1).repeat(16, axis=2))
    modes = stochastic_label_modes(base).to(torch.uint8)  # (B, 32, H, W)
    samples = modes[torch.arange(batch)[:, None], torch.as_tensor(rng.integers(0, 32, size=(batch, n)))]
    noise = torch.from_numpy(rng.random(samples.shape) < 0.05)
    samples = torch.where(noise, torch.from_numpy(rng.integers(0, 24, size=samples.shape, dtype=np.uint8)), samples)
    return samples, modes


def run_cityscapes(args, n: int, mem: PeakMemory):
    """GED (10 switchable classes, ignore 24/255, 32 weighted modes) + HM-IoU on 256x512 maps, one image per call."""
    rng = np.random.default_rng(args.seed)
    weights = stochastic_mode_weights()
    seconds, peak, extra = 0.0, 0.0, 0.0
    for _ in range(args.cityscapes_images):
        samples, modes = make_cityscapes_batch(rng, 1, n)
        mem.reset()
        before = mem.peak_mib()
        t0 = time.perf_counter()
        generalized_energy_distance(
            samples,
            modes,
            classes=CITYSCAPES_SWITCHABLE_CLASSES,
            ignore_index=CITYSCAPES_IGNORE_INDEX,
            label_weights=weights,
        )
        seconds += time.perf_counter() - t0
        peak = max(peak, mem.peak_mib())
        extra = max(extra, mem.peak_mib() - before)
    return seconds, peak, extra


def naive_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else inter / union


def naive_ged_hm(samples: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """GED and HM-IoU of one image, one pair at a time, as in the published evaluation scripts."""
    n, r = len(samples), len(labels)
    d_sy = np.zeros((n, r))
    for i in range(n):
        for j in range(r):
            d_sy[i, j] = 1.0 - naive_iou(samples[i], labels[j])
    d_ss = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d_ss[i, j] = 1.0 - naive_iou(samples[i], samples[j])
    d_yy = np.zeros((r, r))
    for i in range(r):
        for j in range(r):
            d_yy[i, j] = 1.0 - naive_iou(labels[i], labels[j])
    ged = 2 * d_sy.mean() - d_ss.mean() - d_yy.mean()

    tiled = np.concatenate([labels] * (n // r), axis=0)
    cost = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            cost[i, j] = 1.0 - naive_iou(samples[i], tiled[j])
    rows, cols = linear_sum_assignment(cost)
    return ged, float((1.0 - cost[rows, cols]).mean())


def run_vectorised(args, n: int, mem: PeakMemory, shared: bool):
    """Time GED + HM-IoU over the workload: two metric calls, or one shared pairwise-IoU kernel call."""
    rng = np.random.default_rng(args.seed)
    seconds, peak, extra = 0.0, 0.0, 0.0
    geds, hms = [], []
    for start in range(0, args.n_images, args.batch_size):
        batch = min(args.batch_size, args.n_images - start)
        s_np, y_np = make_batch(rng, batch, n, args.raters, args.size, args.pattern)
        s, y = torch.from_numpy(s_np), torch.from_numpy(y_np)
        mem.reset()
        before = mem.peak_mib()
        t0 = time.perf_counter()
        if shared:
            iou = pairwise_iou(s, y, classes=(1,))
            geds.append(energy_distance_from_iou(iou).ged)
            hms.append(matched_iou_from_matrix(iou.sy))
        else:
            geds.append(generalized_energy_distance(s, y, classes=(1,)))
            hms.append(hungarian_matched_iou(s, y, classes=(1,)))
        seconds += time.perf_counter() - t0
        peak = max(peak, mem.peak_mib())
        extra = max(extra, mem.peak_mib() - before)
    return seconds, peak, extra, torch.cat(geds), torch.cat(hms)


def run_naive(args, n: int, mem: PeakMemory, ged_ref: torch.Tensor, hm_ref: torch.Tensor):
    rng = np.random.default_rng(args.seed)
    s_np, y_np = make_batch(rng, min(args.batch_size, args.n_images), n, args.raters, args.size, args.pattern)
    count = min(args.naive_images, len(s_np))
    s_np, y_np = s_np[:count].astype(bool), y_np[:count].astype(bool)
    mem.reset()
    before = mem.peak_mib()
    t0 = time.perf_counter()
    results = [naive_ged_hm(s_np[b], y_np[b]) for b in range(count)]
    seconds = time.perf_counter() - t0
    peak, extra = mem.peak_mib(), mem.peak_mib() - before
    got = np.array(results)
    err = max(
        float(np.abs(got[:, 0] - ged_ref[:count].numpy()).max()),
        float(np.abs(got[:, 1] - hm_ref[:count].numpy()).max()),
    )
    return seconds * args.n_images / count, seconds / count, peak, extra, err, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=1992, help="images in the workload (LIDC v2 test: 1992)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--raters", type=int, default=4)
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 100])
    parser.add_argument("--batch-size", type=int, default=32, help="images per metric call")
    parser.add_argument("--naive-images", type=int, default=10, help="images the naive loop is timed on")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads; 1 avoids OpenMP barrier stalls on a shared box"
    )
    parser.add_argument("--pattern", choices=("lesion", "random"), default="lesion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cityscapes-images",
        type=int,
        default=4,
        help="256x512 Cityscapes-style images for the memory check (0: skip)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mem = PeakMemory()

    rows = []
    for n in args.samples:
        sep_s, sep_peak, sep_extra, ged, hm = run_vectorised(args, n, mem, shared=False)
        sh_s, sh_peak, sh_extra, ged_sh, hm_sh = run_vectorised(args, n, mem, shared=True)
        assert torch.equal(ged, ged_sh) and torch.equal(hm, hm_sh)
        naive_s, naive_per_img, naive_peak, naive_extra, err, count = run_naive(args, n, mem, ged, hm)
        rows.append(
            (
                n,
                sep_s,
                sh_s,
                max(sep_peak, sh_peak),
                max(sep_extra, sh_extra),
                naive_s,
                naive_per_img,
                naive_peak,
                naive_extra,
                err,
                count,
                float(ged.mean()),
                float(hm.mean()),
            )
        )

    print(
        f"\nGED + HM-IoU (classes=(1,)), {args.n_images} images, {args.size}x{args.size}, R={args.raters}, "
        f"pattern={args.pattern}, batch={args.batch_size}, CPU threads={args.threads}, torch {torch.__version__}; "
        f"memory: peak RSS, {mem.method}\n"
    )
    print(
        "| N | car_med, 2 calls (s) | car_med, shared kernel (s) | ms / image (shared) | peak RSS MiB (+ over inputs) "
        "| naive loop (s, extrapolated) | naive ms / image | naive peak RSS MiB | speed-up (2 calls / shared) "
        "| max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, sep_s, sh_s, vp, ve, ns, npi, np_, ne, err, count, _, _ in rows:
        print(
            f"| {n} | {sep_s:.1f} | {sh_s:.1f} | {1000 * sh_s / args.n_images:.1f} | {vp:.0f} (+{ve:.0f}) "
            f"| {ns:.0f} (from {count} images) | {1000 * npi:.0f} | {np_:.0f} (+{ne:.0f}) "
            f"| {ns / sep_s:.0f}x / {ns / sh_s:.0f}x | {err:.1e} |"
        )
    print()
    for n, *_, ged_mean, hm_mean in rows:
        print(f"N={n}: mean GED {ged_mean:.4f}, mean HM-IoU {hm_mean:.4f} on the synthetic workload")

    if args.cityscapes_images > 0:
        print(
            f"\nCityscapes-style GED: {args.cityscapes_images} images, 256x512, R=32 weighted modes, 10 switchable "
            f"classes, ignore 24/255, one image per call, CPU threads={args.threads}\n"
        )
        print("| N | seconds | ms / image | peak RSS MiB (+ over inputs) |")
        print("|---|---|---|---|")
        for n in args.samples:
            seconds, peak, extra = run_cityscapes(args, n, mem)
            per_image = 1000 * seconds / args.cityscapes_images
            print(f"| {n} | {seconds:.1f} | {per_image:.0f} | {peak:.0f} (+{extra:.0f}) |")


if __name__ == "__main__":
    main()
