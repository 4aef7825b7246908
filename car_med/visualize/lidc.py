"""The LIDC sample montage (the paper's Fig. 4): image, readers, their mean, F, Gbar and G's samples per row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from car_med.visualize import isolate_matplotlib_config

__all__ = ["plot_lidc_montage"]


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def plot_lidc_montage(
    images: Sequence,
    labels: Sequence,
    calibration: Sequence,
    mean: Sequence,
    samples: Sequence,
    path: str | Path,
    titles: Sequence[str] | None = None,
    num_samples_shown: int = 6,
) -> Path:
    """Write a PNG with one row per case.

    Columns: the image, each reader's mask, the readers' mean, F's foreground probability, Gbar (the mean of
    all of G's samples, not only those shown) and the first ``num_samples_shown`` samples. Masks and
    probabilities share one grey scale, 0 (black) to 1 (white), so F, Gbar and the readers' mean compare by eye.

    Args:
        images: per case ``(1, H, W)`` or ``(H, W)`` in [0, 1].
        labels: per case ``(R, H, W)`` reader masks.
        calibration: per case F's probabilities ``(C, H, W)``.
        mean: per case Gbar ``(C, H, W)``.
        samples: per case hard samples ``(M, H, W)``.
        path: PNG to write (folders are created).
        titles: per-row labels (e.g. patient and slice).
        num_samples_shown: sample columns.

    Returns:
        The path written.
    """
    isolate_matplotlib_config()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(images)
    if rows == 0:
        raise ValueError("plot_lidc_montage needs at least one case.")
    readers = max(_as_numpy(label).shape[0] for label in labels)
    shown = min(num_samples_shown, min(_as_numpy(s).shape[0] for s in samples))
    headers = ["image"] + [f"reader {k + 1}" for k in range(readers)] + ["readers' mean", "F(x)", "G mean"]
    headers += [f"sample {k + 1}" for k in range(shown)]
    cols = len(headers)
    fig = Figure(figsize=(1.3 * cols, 1.4 * rows + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        label = _as_numpy(labels[r]).astype(np.float32)
        panels = [_as_numpy(images[r]).reshape(label.shape[-2:])]
        panels += [label[k] if k < label.shape[0] else np.zeros(label.shape[-2:]) for k in range(readers)]
        panels += [label.mean(axis=0), _as_numpy(calibration[r])[-1], _as_numpy(mean[r])[-1]]
        panels += [_as_numpy(samples[r])[k] for k in range(shown)]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(headers[c], fontsize=7)
        if titles is not None:
            axes[r][0].set_ylabel(titles[r], fontsize=6)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
