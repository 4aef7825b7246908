"""The 2D calibration check: does CAR sample a hidden tail as often as annotators draw it, and whole?

Trains F (MONAI ``SupervisedTrainer``, CE on one annotator draw per item), then G and D with
``CARTrainer`` on :class:`~car_med.data.ambiguous_tail.AmbiguousTailDataset`, once per variant
(CAR, the cGAN+L_ce baseline, CAR with lambda=0), all from the same F and the same G/D
initialisation. On held-out images it draws ``eval_samples`` samples per image and reports how often
the tail is drawn whole (target: ``tail_probability``), how often only in part (target: 0), how far
Gbar is from F on the tail, and the sample diversity. docs/core.md has the long run's table and
sample grid; tests/experiments run a short one.

Usage:
    python -m car_med.experiments.tail_calibration --output-dir runs/tail                  # docs/core.md: ~30 min
    python -m car_med.experiments.tail_calibration --output-dir runs/tail --variants CAR --g-iterations 2500
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader, RandomSampler

from car_med.data.ambiguous_tail import AmbiguousTailDataset, tail_mode_statistics
from car_med.engines import CARTrainer, NonFiniteLossGuard
from car_med.hypotheses import group_samples, wilson_interval
from car_med.losses import PixelwiseCrossEntropyLoss
from car_med.metrics import sample_diversity
from car_med.networks import Discriminator, NoiseInjectedUNet, SegNetCalibrationNet
from car_med.sampling import CARSampler

__all__ = ["TailCheckConfig", "VARIANTS", "run_tail_check", "format_table", "mode_iou", "tail_hypotheses"]

# name -> CARTrainer overrides; lambda_cal=None keeps the config's lambda
VARIANTS: dict[str, dict] = {
    "CAR": {"regulariser": "calibration"},
    "cGAN+L_ce": {"regulariser": "cross_entropy"},
    "CAR, lambda=0": {"regulariser": "calibration", "lambda_cal": 0.0},
}


@dataclass
class TailCheckConfig:
    """Every setting of the check; the defaults are the long run in docs/core.md.

    Learning rates, lambda and R1 differ from the LIDC bundle's paper values: on this small problem, with
    the tail 1.7% of the pixels, G and D at lr 2e-4 and 1e-4 with gamma 10 did not learn to reject fragments in
    2,500 iterations (tail frequency 0.07, 41% partial tails), and lambda=1 left L_cal too weak against
    L_adv. docs/core.md lists the settings tried.
    """

    size: int = 32
    tail_probability: float = 0.3
    radius: float = 4.0
    tail_length: int = 6
    tail_width: int = 3
    num_train_images: int = 64
    num_test_images: int = 32
    f_iterations: int = 1000
    f_learning_rate: float = 3e-3
    g_iterations: int = 5000
    batch_size: int = 16
    num_samples: int = 8
    g_learning_rate: float = 1e-3
    d_learning_rate: float = 1e-3
    adam_betas: tuple[float, float] = (0.5, 0.99)
    lambda_cal: float = 5.0
    adversarial_weight: float = 1.0
    r1_gamma: float = 1.0
    d_fake_samples: str = "first"
    noise_dim: int = 8
    f_channels: tuple[int, ...] = (16, 32)
    g_channels: tuple[int, ...] = (16, 32, 32, 32)
    d_channels: tuple[int, ...] = (16, 32, 64)
    eval_samples: int = 32
    report_at: tuple[int, ...] = (2500,)
    seed: int = 0
    variants: tuple[str, ...] = field(default_factory=lambda: tuple(VARIANTS))


def _networks(config: TailCheckConfig) -> tuple[SegNetCalibrationNet, NoiseInjectedUNet, Discriminator]:
    f = SegNetCalibrationNet(
        1, 2, channels=config.f_channels, convs_per_block=(1,) * len(config.f_channels), dropout=0.0
    )
    g = NoiseInjectedUNet(1, 2, noise_dim=config.noise_dim, channels=config.g_channels, dropout=0.0)
    d = Discriminator(1, 2, channels=config.d_channels)
    return f, g, d


def _loader(dataset: AmbiguousTailDataset, iterations: int, batch_size: int, seed: int) -> DataLoader:
    # One epoch of exactly `iterations` batches, drawn with replacement; every draw is a fresh annotator.
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=iterations * batch_size, generator=torch.Generator().manual_seed(seed)
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def train_calibration_net(config: TailCheckConfig, f: torch.nn.Module, dataset: AmbiguousTailDataset) -> None:
    """Stage 1: F with pixelwise CE against one annotator draw per item."""
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_loader(dataset, config.f_iterations, config.batch_size, config.seed),
        network=f,
        optimizer=torch.optim.Adam(f.parameters(), config.f_learning_rate),
        loss_function=PixelwiseCrossEntropyLoss(),
        train_handlers=[NonFiniteLossGuard(name="stage 1 (F)")],
        decollate=False,
    )
    trainer.run()


def train_refinement(
    config: TailCheckConfig,
    f: torch.nn.Module,
    g: torch.nn.Module,
    d: torch.nn.Module,
    dataset: AmbiguousTailDataset,
    hooks: list | None = None,
    **trainer_overrides,
) -> CARTrainer:
    """Stage 2: G and D against the frozen F with ``CARTrainer``; each of ``hooks`` gets the trainer first."""
    settings = {"lambda_cal": config.lambda_cal, **trainer_overrides}
    trainer = CARTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_loader(dataset, config.g_iterations, config.batch_size, config.seed + 1),
        calibration_network=f,
        refinement_network=g,
        discriminator=d,
        g_optimizer=torch.optim.Adam(g.parameters(), config.g_learning_rate, betas=config.adam_betas),
        d_optimizer=torch.optim.Adam(d.parameters(), config.d_learning_rate, betas=config.adam_betas),
        noise_dim=config.noise_dim,
        num_samples=config.num_samples,
        adversarial_weight=config.adversarial_weight,
        num_classes=2,
        r1_gamma=config.r1_gamma,
        d_fake_samples=config.d_fake_samples,
        **settings,
    )
    for hook in hooks or []:
        hook(trainer)
    trainer.run()
    return trainer


def evaluate_samples(
    f: torch.nn.Module, g: torch.nn.Module, dataset: AmbiguousTailDataset, num_samples: int, seed: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Mode statistics, |Gbar - F| and diversity of ``num_samples`` samples per held-out image."""
    batch = dataset.batch()
    out = CARSampler(f, g, num_samples=num_samples)(batch["image"], generator=torch.Generator().manual_seed(seed))
    stats = tail_mode_statistics(out.samples, batch["tail"], batch["disc"])
    tail = batch["tail"]
    f_tail = out.calibration[:, 1][tail]
    stats["f_tail_probability"] = float(f_tail.mean())
    stats["mean_vs_f_tail"] = float((out.mean[:, 1][tail] - f_tail).abs().mean())
    stats["mean_vs_f_all"] = float((out.mean[:, 1] - out.calibration[:, 1]).abs().mean())
    stats["diversity"] = float(sample_diversity(out.samples).mean())
    # share of G's tail-pixel probabilities that are not yet decided (between 0.1 and 0.9)
    tail_probs = out.probs[:, :, 1].movedim(1, -1)[tail]
    stats["undecided_tail_probabilities"] = float(((tail_probs > 0.1) & (tail_probs < 0.9)).float().mean())
    return stats, out.samples


def mode_iou(tail: torch.Tensor, disc: torch.Tensor) -> float:
    """The smallest IoU between an image's two label modes, the disc and the disc with its whole tail.

    It is ``|disc| / |disc + tail|``, fixed by the geometry; a ``min_iou`` above it keeps the modes apart.
    """
    disc_pixels = disc.flatten(1).sum(-1).double()
    return float((disc_pixels / (disc_pixels + (tail & ~disc).flatten(1).sum(-1).double())).min())


def tail_hypotheses(
    samples: torch.Tensor, tail: torch.Tensor, *, true_probability: float, min_iou: float, confidence: float = 0.95
) -> dict[str, float]:
    """Group each image's samples into hypotheses and compare the mass that draws the tail with the truth.

    A hypothesis *draws the tail* when its representative covers more than half of the tail pixels.

    Args:
        samples: hard samples ``(B, M, S, S)`` (class 1 is foreground).
        tail: ``(B, S, S)`` bool tail masks.
        true_probability: the chance that an annotator draws the tail (the dataset's ``tail_probability``).
        min_iou: the grouping's ``min_iou`` (see :func:`mode_iou` for where it must lie).
        confidence: the Wilson intervals' confidence.

    Returns:
        ``tail_probability`` (mean over images of the total probability of the hypotheses that draw the tail),
        ``per_image_std`` (its spread over images), ``hypotheses_per_image`` (mean count), ``fragment_mass`` (mean
        probability outside each image's two largest hypotheses), ``interval_coverage`` (share of images where
        the Wilson interval of the tail-drawing samples' share holds ``true_probability``; about
        ``confidence`` for a calibrated sampler), ``max_partition_error`` (the largest |sum of probabilities - 1|
        over images, or 1 where the members do not partition the samples; 0 when all is well).
    """
    foreground = (samples == 1).cpu().numpy()
    tails = tail.cpu().numpy()
    per_image, counts, fragments, partition_error, covered = [], [], [], 0.0, []
    for masks, tail_mask in zip(foreground, tails):
        hypotheses = group_samples(masks, min_iou=min_iou, confidence=confidence)
        members = sorted(i for h in hypotheses for i in h.members)
        if members != list(range(len(masks))):
            partition_error = max(partition_error, 1.0)
        partition_error = max(partition_error, abs(sum(h.probability for h in hypotheses) - 1.0))
        drawing = [h for h in hypotheses if masks[h.representative][tail_mask].mean() > 0.5]
        per_image.append(sum(h.probability for h in drawing))
        low, high = wilson_interval(sum(h.count for h in drawing), len(masks), confidence)
        covered.append(low <= true_probability <= high)
        counts.append(len(hypotheses))
        fragments.append(sum(h.probability for h in hypotheses[2:]))
    per_image_t = torch.tensor(per_image, dtype=torch.float64)
    return {
        "tail_probability": float(per_image_t.mean()),
        "per_image_std": float(per_image_t.std()) if len(per_image) > 1 else 0.0,
        "hypotheses_per_image": float(sum(counts) / len(counts)),
        "fragment_mass": float(sum(fragments) / len(fragments)),
        "interval_coverage": float(sum(covered) / len(covered)),
        "max_partition_error": partition_error,
    }


def _report_during_training(
    trainer: CARTrainer, *, config: TailCheckConfig, f, g, test: AmbiguousTailDataset, into: dict
) -> None:
    """Evaluate on the held-out set at the stage-2 iterations in ``config.report_at``."""
    wanted = set(config.report_at)

    def report(engine: CARTrainer) -> None:
        if engine.state.iteration in wanted:
            into[engine.state.iteration] = evaluate_samples(f, g, test, config.eval_samples, config.seed)[0]

    trainer.add_event_handler(Events.ITERATION_COMPLETED, report)


def run_tail_check(
    config: TailCheckConfig, progress: bool = False
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor], AmbiguousTailDataset]:
    """Train F once, then every variant of ``config.variants`` from the same G/D start; evaluate each.

    Returns:
        ``(results, samples, test_set)``: per variant its statistics (see :func:`evaluate_samples`,
        plus ``seconds``), per variant the hard samples ``(B, M, S, S)``, and the held-out data.
    """
    torch.manual_seed(config.seed)
    shape = {"radius": config.radius, "tail_length": config.tail_length, "tail_width": config.tail_width}
    train = AmbiguousTailDataset(
        config.num_train_images, config.size, config.tail_probability, seed=config.seed, **shape
    )
    test = AmbiguousTailDataset(
        config.num_test_images, config.size, config.tail_probability, seed=config.seed + 1000, **shape
    )
    f, g0, d0 = _networks(config)
    start = time.perf_counter()
    train_calibration_net(config, f, train)
    if progress:
        print(f"F trained in {time.perf_counter() - start:.0f} s", flush=True)
    results, samples = {}, {}
    for name in config.variants:
        g, d = copy.deepcopy(g0), copy.deepcopy(d0)
        torch.manual_seed(config.seed + 1)
        start = time.perf_counter()
        during: dict[int, dict[str, float]] = {}
        hooks = [functools.partial(_report_during_training, config=config, f=f, g=g, test=test, into=during)]
        hooks = hooks if config.report_at else []
        train_refinement(config, f, g, d, train, hooks=hooks, **VARIANTS[name])
        stats, drawn = evaluate_samples(f, g, test, config.eval_samples, config.seed)
        stats["seconds"] = time.perf_counter() - start
        if during:
            stats["during_training"] = during
        results[name], samples[name] = stats, drawn
        if progress:
            shown = {k: round(v, 4) for k, v in stats.items() if isinstance(v, float)}
            print(f"{name}: {json.dumps(shown)}", flush=True)
            for iteration, at in sorted(during.items()):
                print(f"  at {iteration}: {json.dumps({k: round(v, 4) for k, v in at.items()})}", flush=True)
    return results, samples, test


def format_table(results: dict[str, dict[str, float]], tail_probability: float) -> str:
    """A markdown table of the statistics a reader compares."""
    lines = [
        f"| variant | tail frequency (target {tail_probability:g}) | partial tails | F on tail | |Gbar - F| on tail "
        "| undecided | diversity | disc recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['tail_frequency']:.3f} | {s['partial_share']:.3f} | {s['f_tail_probability']:.3f} "
            f"| {s['mean_vs_f_tail']:.3f} | {s['undecided_tail_probabilities']:.3f} | {s['diversity']:.3f} "
            f"| {s['disc_recall']:.3f} |"
        )
    return "\n".join(lines)


def plot_sample_grid(
    samples: dict[str, torch.Tensor], test: AmbiguousTailDataset, path: Path, images: int = 3, columns: int = 8
) -> Path:
    """Rows: per image, the image then ``columns`` samples of each variant; the tail outlined in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(samples.values()))
    images, columns = min(images, first.shape[0]), min(columns, first.shape[1])
    rows = images * len(samples)
    fig, axes = plt.subplots(rows, columns + 1, figsize=(1.2 * (columns + 1), 1.25 * rows), squeeze=False)
    batch = test.batch(list(range(images)))
    for i in range(images):
        for v, (name, drawn) in enumerate(samples.items()):
            row = axes[i * len(samples) + v]
            row[0].imshow(batch["image"][i, 0], cmap="gray")
            row[0].set_ylabel(f"{name}\nimage {i}", fontsize=6)
            for m in range(columns):
                row[m + 1].imshow(drawn[i, m], cmap="gray", vmin=0, vmax=1)
                row[m + 1].contour(batch["tail"][i].float(), levels=[0.5], colors="red", linewidths=0.5)
            for ax in row:
                ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("samples per image; red: the hidden tail (drawn by annotators with its probability)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/tail_calibration"))
    parser.add_argument("--threads", type=int, default=2)
    for name, value in asdict(TailCheckConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            kind = str if name == "variants" else (type(value[0]) if value else int)
            parser.add_argument(flag, type=kind, nargs="+", default=None)
        else:
            parser.add_argument(flag, type=type(value), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k not in ("output_dir", "threads") and v is not None}
    config = replace(TailCheckConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    unknown = set(config.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    results, samples, test = run_tail_check(config, progress=True)
    table = format_table(results, config.tail_probability)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps({"config": asdict(config), "results": results}, indent=2))
    figure = plot_sample_grid(samples, test, args.output_dir / "tail_samples.png")
    print(f"\n2D calibration check, {config.g_iterations} stage-2 iterations, {args.threads} threads\n")
    print(table)
    print(f"\nwrote {args.output_dir / 'results.json'} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
