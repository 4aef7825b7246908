"""Stage-2 seconds per iteration and peak memory of CARTrainer.

Compares memory_saving "none", "chunked" and "checkpoint", with the light or the authors' discriminator.

Usage:
    python benchmarks/bench_train_step.py [--batch-size 8] [--num-samples 20] [--size 128] [--threads 2]
        [--repeats 3] [--warmup 2] [--rounds 1] [--variant none chunked checkpoint] [--discriminator light authors]
        [--chunk-size 4] [--channels-last] [--amp] [--retain-freed-memory] [--device auto]

The networks are the default LIDC ones with random weights (speed does not depend on them): F is
``SegNetCalibrationNet(in_channels=1, out_channels=2)``, G ``NoiseInjectedUNet(image_channels=1,
num_classes=2, noise_dim=8)``, D ``Discriminator(image_channels=1, num_classes=2)`` ("light", the paper's
DCGAN stack) or the same with ``full_resolution_convs=3`` ("authors", the three full-resolution
64-channel convolutions of the authors' code). The trainer uses the LIDC bundle's settings (10 * L_adv +
5 * L_cal, R1 gamma 10, D stepping every iteration). On a GPU (``torch.cuda.is_available()``) the batch
size defaults to 32, the paper's, and 8 on CPU.

Every configuration runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own; each
subprocess runs ``--warmup`` untimed iterations (2 by default: the first two still fault in fresh pages, the
second about 70,000 of them even with ``--retain-freed-memory``, after which a step faults none) and then
``--repeats`` timed ones. ``--rounds`` repeats the whole
set of subprocesses, alternating the configurations, which spreads the noise of a shared machine over
all of them. The table gives the median and the best seconds per iteration over every timed iteration.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("none", "chunked", "checkpoint")
DISCRIMINATORS = {"light": 0, "authors": 3}


def run_child(config: dict) -> dict:
    """One configuration, in this process: warm-up plus timed iterations of a real CARTrainer."""
    import torch
    from ignite.engine import Events

    from car_med.engines import CARTrainer
    from car_med.networks import Discriminator, NoiseInjectedUNet, SegNetCalibrationNet

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    if config["retain_freed_memory"]:
        from car_med.engines.allocator import retain_freed_memory

        retain_freed_memory()
    device = torch.device(config["device"])
    b, m, size = config["batch_size"], config["num_samples"], config["size"]
    # the LIDC bundle's channels_last switch: networks and images in channels-last memory format
    fmt = torch.channels_last if config["channels_last"] else torch.contiguous_format
    f = SegNetCalibrationNet(in_channels=1, out_channels=2).to(device, memory_format=fmt)
    g = NoiseInjectedUNet(image_channels=1, num_classes=2, noise_dim=8).to(device, memory_format=fmt)
    d = Discriminator(
        image_channels=1, num_classes=2, full_resolution_convs=DISCRIMINATORS[config["discriminator"]]
    ).to(device, memory_format=fmt)
    iterations = config["warmup"] + config["repeats"]
    batches = [
        {
            "image": torch.randn(b, 1, size, size).contiguous(memory_format=fmt),
            "label": torch.randint(0, 2, (b, 1, size, size)),
        }
        for _ in range(iterations)
    ]
    trainer = CARTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=batches,
        calibration_network=f,
        refinement_network=g,
        discriminator=d,
        g_optimizer=torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.99)),
        d_optimizer=torch.optim.Adam(d.parameters(), 1e-5, betas=(0.5, 0.99)),
        noise_dim=8,
        num_samples=m,
        lambda_cal=5.0,
        adversarial_weight=10.0,
        num_classes=2,
        r1_gamma=10.0,
        memory_saving=config["variant"],
        amp=config.get("amp", False),
        chunk_size=config["chunk_size"],
    )
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    times: list[float] = []
    start = [0.0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @trainer.on(Events.ITERATION_STARTED)
    def _start(_engine) -> None:
        sync()
        start[0] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(_engine) -> None:
        sync()
        times.append(time.perf_counter() - start[0])

    trainer.run()
    result = {
        "times": times[config["warmup"] :],
        "warmup": times[: config["warmup"]],
        # Linux reports ru_maxrss in KiB
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "base_rss_gb": base_rss,  # networks, optimisers and batches built, before the first iteration
    }
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def _cpu_pressure() -> str:
    """Linux's share of the last minute in which some runnable task waited for a CPU (other load on the machine)."""
    try:
        with open("/proc/pressure/cpu") as fh:
            return fh.readline().split()[2].replace("avg60=", "") + "%"
    except (OSError, IndexError):
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="B (default: 32 on a GPU, 8 on CPU)")
    parser.add_argument("--num-samples", type=int, default=20, help="M, samples per image")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every subprocess")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per subprocess (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per subprocess before the timed ones")
    parser.add_argument("--rounds", type=int, default=1, help="subprocesses per configuration, alternated")
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="memory_saving")
    parser.add_argument("--discriminator", nargs="+", choices=list(DISCRIMINATORS), default=list(DISCRIMINATORS))
    parser.add_argument("--chunk-size", type=int, default=4, help="CARTrainer chunk_size for 'chunked'")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu' or 'cuda'")
    parser.add_argument("--channels-last", action="store_true", help="networks and images in channels_last")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="CARTrainer(amp=True), the LIDC bundle's amp switch: bfloat16 autocast (memory_saving 'none' only)",
    )
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="car_med.engines.allocator.retain_freed_memory() in every subprocess (the LIDC bundle's switch)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch = args.batch_size or (32 if device == "cuda" else 8)
    configs = [
        {
            "discriminator": disc,
            "variant": variant,
            "device": device,
            "batch_size": batch,
            "num_samples": args.num_samples,
            "size": args.size,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "chunk_size": args.chunk_size,
            "channels_last": args.channels_last,
            "amp": args.amp,
            "retain_freed_memory": args.retain_freed_memory,
        }
        for disc in args.discriminator
        for variant in args.variant
        # CARTrainer refuses amp with the chunked step
        if not (args.amp and variant == "chunked")
    ]
    if not configs:
        parser.error("--amp runs with --variant none only (CARTrainer refuses amp with memory_saving 'chunked')")
    if args.amp and "chunked" in args.variant:
        print("--amp: skipping memory_saving 'chunked' (CARTrainer refuses amp with it)", file=sys.stderr)
    results: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for r in range(args.rounds):
        # alternate the order from round to round so that no configuration always runs first
        order = range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))
        for i in order:
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(configs[i])], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(f"configuration {configs[i]} failed:\n{out.stderr}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[i].append(res)
            name = f"{configs[i]['discriminator']}/{configs[i]['variant']}"
            shown = ", ".join(f"{t:.2f}" for t in res["times"])
            print(
                f"round {r + 1}/{args.rounds} {name}: s/iteration {shown}; peak RSS {res['peak_rss_gb']:.2f} GB; "
                f"CPU pressure {_cpu_pressure()}",
                file=sys.stderr,
            )

    cuda = device == "cuda"
    print(
        f"\nCARTrainer stage 2, B={batch}, M={args.num_samples}, {args.size}x{args.size}, {device}"
        + ("" if cuda else f", threads={args.threads}")
        + (", channels_last" if args.channels_last else "")
        + (", amp (bfloat16 autocast)" if args.amp else "")
        + (", retain_freed_memory" if args.retain_freed_memory else "")
        + f", {args.rounds} subprocess(es) x {args.repeats} timed iterations (after {args.warmup} warm-up)"
        + " per configuration\n"
    )
    header = "| D | memory_saving | s/iteration (median) | s/iteration (best) | iterations/s (median) | peak RSS (GB) |"
    print(header + (" peak CUDA (GB) |" if cuda else ""))
    print("|---" * (7 if cuda else 6) + "|")
    for i, config in enumerate(configs):
        times = [t for res in results[i] for t in res["times"]]
        median, best = statistics.median(times), min(times)
        rss = max(res["peak_rss_gb"] for res in results[i])
        row = f"| {config['discriminator']} | {config['variant']} | {median:.2f} | {best:.2f} | {1 / median:.3f} "
        row += f"| {rss:.2f} |"
        if cuda:
            row += f" {max(res['peak_cuda_gb'] for res in results[i]):.2f} |"
        print(row)


if __name__ == "__main__":
    main()
