"""Figures of the toy experiment: Fig. 3a (likelihood over training) and Fig. 3b/c (samples)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from car_med.visualize import isolate_matplotlib_config

isolate_matplotlib_config()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_toy_samples", "plot_likelihood_curves", "toy_sample_summary"]


def toy_sample_summary(npz_path: str | Path) -> dict[str, float]:
    """Numbers behind Fig. 3b/c from an inference ``samples.npz``.

    Returns:
        ``frac_below_zero_bimodal``: fraction of samples below 0 for x in [0, 0.4) (pi when calibrated);
        ``calibration_error``: mean over x of |mean of samples - F(x)|;
        ``target_error``: mean over x of |mean of samples - E[y|x]|;
        ``sample_std_bimodal``: mean per-x std of the samples on [0, 0.4) (near 0 means mode collapse).
    """
    data = np.load(npz_path)
    x, samples, target = data["x"], data["samples"], data["calibration_target"]
    bimodal = x < 0.4
    return {
        "frac_below_zero_bimodal": float((samples[bimodal] < 0).mean()),
        "calibration_error": float(np.abs(samples.mean(axis=1) - target).mean()),
        "target_error": float(np.abs(samples.mean(axis=1) - data["expected_y"]).mean()),
        "sample_std_bimodal": float(samples[bimodal].std(axis=1).mean()),
    }


def plot_toy_samples(
    npz_path: str | Path, output_file: str | Path, title: str = "", data: tuple[float, float] | None = None
) -> str:
    """Fig. 3b/c: D's output as background, the samples, their mean and the calibration target F(x).

    Args:
        npz_path: inference output ``samples.npz``.
        output_file: PNG path.
        title: figure title.
        data: ``(pi, sigma)`` of the training data, to draw 1000 fresh data points as black dots.
    """
    data_points = None
    if data is not None:
        import torch

        from car_med.data.toy import sample_toy

        x, y = sample_toy(1000, data[0], data[1], torch.Generator().manual_seed(0))
        data_points = (x[:, 0].numpy(), y[:, 0].numpy())
    data = np.load(npz_path)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    extent = (float(data["d_x"][0]), float(data["d_x"][-1]), float(data["d_y"][0]), float(data["d_y"][-1]))
    image = ax.imshow(
        data["d_prob"], origin="lower", extent=extent, aspect="auto", cmap="coolwarm", vmin=0, vmax=1, alpha=0.6
    )
    fig.colorbar(image, ax=ax, label="D(x, y): 1 = real, 0 = fake")
    if data_points is not None:
        ax.scatter(data_points[0], data_points[1], s=2, c="black", label="data", alpha=0.5)
    x, samples = data["x"], data["samples"]
    ax.scatter(np.repeat(x, samples.shape[1]), samples.reshape(-1), s=1, c="deepskyblue", alpha=0.25, label="samples")
    ax.plot(x, samples.mean(axis=1), c="navy", lw=2, label="mean of samples")
    ax.plot(x, data["calibration_target"], c="red", lw=1.5, ls="--", label="calibration target F(x)")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(output_file)
    plt.close(fig)
    return str(output_file)


def plot_likelihood_curves(
    curves: Mapping[str, Sequence[np.ndarray]], iterations: np.ndarray, output_file: str | Path, title: str = ""
):
    """Fig. 3a: median and inter-quartile range over runs of the data log-likelihood during training.

    Args:
        curves: label -> list of per-run curves (each the same length as ``iterations``).
        iterations: x axis.
        output_file: PNG path.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, runs in curves.items():
        stacked = np.stack(runs)
        q25, median, q75 = np.percentile(stacked, [25, 50, 75], axis=0)
        line = ax.plot(iterations, median, lw=1.5, label=f"{label} (median, n={len(runs)})")[0]
        ax.fill_between(iterations, q25, q75, color=line.get_color(), alpha=0.25)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("adversarial iteration")
    ax.set_ylabel("mean log p(sample | x)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_file)
    plt.close(fig)
    return str(output_file)
